//! Values copied into commands from earlier answers, and secrets kept out of messages.

use std::path::Path;

use super::expect::{glob, values_of};
use super::shell;

/// `text` with its `…` values copied from the latest of `answers` that has them: the
/// command to run, and the values filled in (kept out of messages).
pub fn fill(text: &str, answers: &[String]) -> Result<(String, Vec<String>), String> {
    fill_with(text, |field, pattern| {
        answers
            .iter()
            .rev()
            .find_map(|answer| {
                values_of(answer, field)
                    .into_iter()
                    .find(|v| glob(pattern, v))
            })
            .ok_or_else(|| format!("no answer above has a `{field}` like `{pattern}` to fill in"))
    })
}

/// [`fill`] with `lookup(field, pattern)` giving each value.
pub fn fill_with(
    text: &str,
    lookup: impl Fn(&str, &str) -> Result<String, String>,
) -> Result<(String, Vec<String>), String> {
    let mut text = text.to_owned();
    let mut values = Vec::new();
    // NAME=PATTERN   # the FIELD printed above
    let assignment = text.split_once('#').and_then(|(assignment, comment)| {
        let (name, pattern) = assignment.trim().split_once('=')?;
        let is_name = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        (is_name && pattern.contains('…') && !pattern.contains(char::is_whitespace))
            .then_some((name, pattern, comment))
    });
    if let Some((name, pattern, comment)) = assignment {
        let field = comment
            .trim()
            .strip_prefix("the ")
            .and_then(|c| c.split([' ', ',']).next());
        let field =
            field.ok_or("write `NAME=…  # the FIELD …` for a value copied from an answer")?;
        let value = lookup(field, pattern)?;
        if value.contains('\'') {
            return Err(format!("the `{field}` value has a quote"));
        }
        values.push(value.clone());
        text = format!("{name}='{value}'   #{comment}");
    }
    // "snake_field": "PATTERN" inside a command's JSON
    while let Some(at) = text.find('…') {
        let open = text[..at].rfind('"').ok_or("a `…` the test cannot fill")?;
        let close = at + text[at..].find('"').ok_or("a `…` the test cannot fill")?;
        let before = text[..open].trim_end().strip_suffix(':').map(str::trim_end);
        let key = before
            .and_then(|b| b.strip_suffix('"'))
            .and_then(|b| b.rsplit('"').next());
        let key = key.ok_or(
            "a `…` the test cannot fill: only `\"field\": \"…\"` in JSON or `NAME=…  # the FIELD`",
        )?;
        let field = camel_case(key);
        let value = lookup(&field, &text[open + 1..close])?;
        values.push(value.clone());
        text.replace_range(open + 1..close, &value);
    }
    Ok((text, values))
}

/// `key_id` → `keyId` (grpcurl prints JSON names).
fn camel_case(snake: &str) -> String {
    let mut parts = snake.split('_');
    let first = parts.next().unwrap_or_default().to_owned();
    parts.fold(first, |mut out, part| {
        let mut chars = part.chars();
        out.extend(chars.next().map(|c| c.to_ascii_uppercase()));
        out.push_str(chars.as_str());
        out
    })
}

/// The secret values of the stack's env file (tokens and secrets).
pub fn stack_secrets(env: &Path) -> Vec<String> {
    shell::read(env)
        .lines()
        .filter_map(|line| line.strip_prefix("export ")?.split_once('='))
        .filter(|(name, _)| name.contains("TOKEN") || name.contains("SECRET"))
        .map(|(_, value)| value.trim_matches('\'').to_owned())
        .filter(|value| !value.is_empty())
        .collect()
}

/// `text` without `secrets` and without anything that looks like a JWT.
pub fn redact(text: &str, secrets: &[String]) -> String {
    let mut text = secrets.iter().fold(text.to_owned(), |text, secret| {
        text.replace(secret.as_str(), "<redacted>")
    });
    while let Some(at) = text.find("eyJ") {
        let end = text[at..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || "-_.".contains(c)))
            .map_or(text.len(), |len| at + len);
        text.replace_range(at..end, "<token>");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answers() -> Vec<String> {
        vec![
            r#"{ "key": { "keyId": "ak_1" }, "secret": "s1" }"#.to_owned(),
            r#"{ "key": { "keyId": "ak_2" } }"#.to_owned(),
        ]
    }

    #[test]
    fn fills_assignments_from_the_field_their_comment_names() {
        let (text, values) = fill("KEY_ID=ak_…   # the keyId printed above", &answers()).unwrap();
        assert_eq!(text, "KEY_ID='ak_2'   # the keyId printed above");
        assert_eq!(values, ["ak_2"]);
        let (text, _) = fill("KEY_SECRET=…  # the secret printed above", &answers()).unwrap();
        assert!(text.starts_with("KEY_SECRET='s1'"));
        assert!(fill("SLOT=…  # the slotId of job-1", &answers()).is_err());
    }

    #[test]
    fn fills_json_values_by_their_camel_case_field() {
        let command = r#"grpcurl -d '{"key_id": "ak_…"}' host Disable"#;
        let (text, _) = fill(command, &answers()).unwrap();
        assert_eq!(text, r#"grpcurl -d '{"key_id": "ak_2"}' host Disable"#);
        assert!(fill("echo …", &answers()).is_err());
    }

    #[test]
    fn redacts_secrets_and_jwts() {
        let text = "secret s3cr3t token eyJhbGciOi.eyJzdWIi.sig-_x, done";
        assert_eq!(
            redact(text, &["s3cr3t".to_owned()]),
            "secret <redacted> token <token>, done"
        );
    }
}
