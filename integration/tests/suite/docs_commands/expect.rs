//! Documented output against real output. `…` matches anything, and three shapes are told
//! apart by what the documentation shows:
//!
//! - an error (`ERROR:` / `Code: X  Message: M`): grpcurl's exit status is 64 + the code
//!   and its `Code:`/`Message:` lines match exactly, whitespace aside, up to `…`;
//! - JSON-ish (any `{` or `"`): the keys and literal values shown, in order, with anything
//!   between — `"key": value`, a bare string, or a bare word such as `CREATED` standing for
//!   a value ending in `_CREATED` (the timeline summaries), `×2` repeating the one before;
//!   text in parentheses is a remark, not output;
//! - plain lines: line by line (a `…` line stands for any number of lines).

/// What a command's documented output asks of it.
#[derive(Debug, Clone, PartialEq)]
pub enum Expected {
    /// Any output (nothing documented); exit 0.
    Anything,
    /// A failed call: the gRPC code's name and the message pattern.
    Error { code: String, message: String },
    /// JSON-ish items, in order.
    Items(Vec<Item>),
    /// Plain line patterns.
    Lines(Vec<String>),
}

/// One item of JSON-ish output.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// `"key": value` (`None`: an object or array follows).
    Pair(String, Option<String>),
    /// A string or literal on its own (an array element).
    Value(String),
    /// A bare word of the documentation: a value equal to it or ending in `_WORD`.
    Word(String),
}

/// gRPC status codes by the names grpcurl prints.
const CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

impl Expected {
    /// Reads documented output lines.
    pub fn parse(lines: &[String]) -> Result<Self, String> {
        let joined = lines.join("\n");
        let flat = squeeze(&joined);
        if flat.is_empty() {
            return Ok(Self::Anything);
        }
        let error = flat.strip_prefix("ERROR: ").unwrap_or(&flat);
        if let Some(rest) = error.strip_prefix("Code: ") {
            let (code, message) = rest
                .split_once(" Message: ")
                .ok_or_else(|| format!("an error needs `Code: X  Message: …`: {flat}"))?;
            if !CODES.contains(&code) {
                return Err(format!("unknown gRPC code `{code}`"));
            }
            return Ok(Self::Error {
                code: code.to_owned(),
                message: message.to_owned(),
            });
        }
        if joined.contains(['{', '"']) {
            return Ok(Self::Items(items(&joined, true)?));
        }
        Ok(Self::Lines(
            lines.iter().map(|l| l.trim().to_owned()).collect(),
        ))
    }

    /// The exit status a command with this documented output must end with.
    pub fn exit_status(&self) -> i32 {
        match self {
            Self::Error { code, .. } => {
                64 + CODES.iter().position(|c| c == code).unwrap_or(2) as i32
            }
            _ => 0,
        }
    }

    /// Checks `output`. With `whole`, plain lines must account for all of it (a command
    /// that ended); otherwise they may be among other lines (a terminal that goes on).
    pub fn check(&self, output: &str, whole: bool) -> Result<(), String> {
        match self {
            Self::Anything => Ok(()),
            Self::Error { code, message } => {
                let flat = squeeze(output);
                let Some((_, got)) = flat.split_once("Code: ") else {
                    return Err("no `Code: …` error in the output".into());
                };
                let wanted = format!("{code} Message: {message}");
                if glob(&wanted, got) {
                    Ok(())
                } else {
                    Err(format!("expected `Code: {wanted}`, got `Code: {got}`"))
                }
            }
            Self::Items(wanted) => {
                let got = items(output, false)?;
                let mut rest = got.iter();
                for (number, item) in wanted.iter().enumerate() {
                    if !rest.any(|g| item.matches(g)) {
                        return Err(format!(
                            "documented item {} of {}, {item:?}, is missing (or out of order)",
                            number + 1,
                            wanted.len()
                        ));
                    }
                }
                Ok(())
            }
            Self::Lines(wanted) => lines_match(wanted, output, whole),
        }
    }
}

impl Item {
    fn matches(&self, got: &Item) -> bool {
        let value = match got {
            Item::Pair(_, value) => value.as_deref(),
            Item::Value(value) => Some(value.as_str()),
            Item::Word(_) => None,
        };
        match (self, got) {
            (Item::Pair(key, None), Item::Pair(got_key, _)) => key == got_key,
            (Item::Pair(key, Some(wanted)), Item::Pair(got_key, Some(value))) => {
                key == got_key && glob(wanted, value)
            }
            (Item::Value(wanted), _) => value.is_some_and(|v| glob(wanted, v)),
            (Item::Word(word), _) => {
                value.is_some_and(|v| v == word || v.ends_with(&format!("_{word}")))
            }
            _ => false,
        }
    }
}

/// The values of `"field": "…"` in JSON-ish `output`, in order.
pub fn values_of(output: &str, field: &str) -> Vec<String> {
    items(output, false)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|item| match item {
            Item::Pair(key, Some(value)) if key == field => Some(value),
            _ => None,
        })
        .collect()
}

/// `pattern` (where `…` matches any text) against all of `text`.
pub fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('…').collect();
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if parts.len() == 1 {
        return pattern == text;
    }
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(at) => rest = &rest[at + middle.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// Whitespace runs as one space, trimmed.
fn squeeze(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn lines_match(wanted: &[String], output: &str, whole: bool) -> Result<(), String> {
    let got: Vec<&str> = output
        .lines()
        .map(|l| l.trim_end_matches('\r').trim())
        .filter(|l| !l.is_empty())
        .collect();
    let missing = |line: &str| format!("no line `{line}` (in order) in the output");
    if !whole {
        let mut rest = got.iter();
        for line in wanted.iter().filter(|l| l.as_str() != "…") {
            if !rest.any(|g| glob(line, g)) {
                return Err(missing(line));
            }
        }
        return Ok(());
    }
    // Each pattern line is one line, a lone `…` any number of them: a small backtracking match.
    fn from(wanted: &[String], got: &[&str]) -> bool {
        match wanted.split_first() {
            None => got.is_empty(),
            Some((line, rest)) if line == "…" => {
                (0..=got.len()).any(|skip| from(rest, &got[skip..]))
            }
            Some((line, rest)) => {
                got.first().is_some_and(|g| glob(line, g)) && from(rest, &got[1..])
            }
        }
    }
    if from(wanted, &got) {
        Ok(())
    } else {
        Err(format!(
            "the output is not exactly the documented lines {wanted:?}"
        ))
    }
}

/// Tokens of JSON-ish text.
#[derive(Debug, PartialEq)]
enum Token {
    Open,
    Colon,
    Text(String),
    Word(String),
    Repeat(usize),
    /// A `…` of the documentation between items: it keeps `key: … value` apart.
    Gap,
}

fn tokens(text: &str, documented: bool) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        match c {
            '{' | '[' => tokens.push(Token::Open),
            ':' => tokens.push(Token::Colon),
            '"' => {
                let mut end = None;
                let mut escaped = false;
                for (i, c) in chars.by_ref() {
                    match (escaped, c) {
                        (false, '\\') => escaped = true,
                        (false, '"') => {
                            end = Some(i);
                            break;
                        }
                        _ => escaped = false,
                    }
                }
                let end = end.ok_or_else(|| format!("unclosed string in `{text}`"))?;
                let raw = &text[at..=end];
                let value: String =
                    serde_json::from_str(raw).unwrap_or_else(|_| raw[1..raw.len() - 1].to_owned());
                tokens.push(Token::Text(value));
            }
            '(' if documented => {
                // a remark: `(after the Release)`, `(the secret is shown only here)`
                for (_, c) in chars.by_ref() {
                    if c == ')' {
                        break;
                    }
                }
            }
            '×' if documented => {
                let mut count = String::new();
                while let Some((_, d)) = chars.peek().filter(|(_, d)| d.is_ascii_digit()) {
                    count.push(*d);
                    chars.next();
                }
                tokens.push(Token::Repeat(
                    count.parse().map_err(|_| "`×` needs a count".to_owned())?,
                ));
            }
            '…' if documented => tokens.push(Token::Gap),
            c if c.is_whitespace() || matches!(c, ',' | '}' | ']' | '…') => {}
            _ => {
                let mut word = c.to_string();
                while let Some((_, d)) = chars
                    .peek()
                    .filter(|(_, d)| !d.is_whitespace() && !"{}[],:\"…".contains(*d))
                {
                    word.push(*d);
                    chars.next();
                }
                tokens.push(Token::Word(word));
            }
        }
    }
    Ok(tokens)
}

/// JSON-ish text as items. In documented text, a bare word that is not a literal
/// (number, `true`, …) is a [`Item::Word`].
fn items(text: &str, documented: bool) -> Result<Vec<Item>, String> {
    let tokens = tokens(text, documented)?;
    let mut items: Vec<Item> = Vec::new();
    let mut index = 0;
    while index < tokens.len() {
        let scalar = |t: &Token| match t {
            Token::Text(s) | Token::Word(s) => Some(s.clone()),
            _ => None,
        };
        match &tokens[index] {
            Token::Text(_) | Token::Word(_) if tokens.get(index + 1) == Some(&Token::Colon) => {
                let key = scalar(&tokens[index]).expect("a text or word");
                let value = tokens.get(index + 2).and_then(scalar);
                index += if value.is_some() { 3 } else { 2 };
                items.push(Item::Pair(key, value));
            }
            Token::Text(s) => {
                items.push(Item::Value(s.clone()));
                index += 1;
            }
            Token::Word(w) => {
                let literal = !documented
                    || w.parse::<f64>().is_ok()
                    || ["true", "false", "null"].contains(&w.as_str());
                items.push(if literal {
                    Item::Value(w.clone())
                } else {
                    Item::Word(w.clone())
                });
                index += 1;
            }
            Token::Repeat(count) => {
                let last = items
                    .last()
                    .cloned()
                    .ok_or("`×N` needs an item before it")?;
                items.extend(std::iter::repeat_n(last, count.saturating_sub(1)));
                index += 1;
            }
            Token::Open | Token::Colon | Token::Gap => index += 1,
        }
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(lines: &[&str]) -> Expected {
        Expected::parse(&lines.iter().map(|l| l.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn globs_match_with_ellipses_anywhere() {
        assert!(glob("ak_…", "ak_123"));
        assert!(glob("a…c…e", "abcde"));
        assert!(!glob("a…c", "abd"));
        assert!(!glob("ab…ba", "aba"));
        assert!(glob("…", ""));
    }

    #[test]
    fn json_items_match_in_order_with_words_and_repeats() {
        let expected = doc(&[
            r#"{ "communication": { "state": "COMMUNICATION_STATE_CONNECTED", "n": 1, … "#,
            r#"  "timeline": [ CREATED, LIMIT "slot granted", LEG_STARTED ×2 ] } }  (a remark)"#,
        ]);
        let output = r#"{"communication": {"state": "COMMUNICATION_STATE_CONNECTED", "n": 1,
            "timeline": [{"kind": "KIND_CREATED"}, {"kind": "KIND_LIMIT", "message": "slot granted"},
            {"kind": "KIND_LEG_STARTED"}, {"kind": "KIND_LEG_STARTED"}]}}"#;
        assert_eq!(expected.check(output, true), Ok(()));
        let once = output.replacen(r#"{"kind": "KIND_LEG_STARTED"}, "#, "", 1);
        assert!(expected.check(&once, true).is_err());
        assert!(
            doc(&[r#"{ "revision": "33" }"#])
                .check(r#"{"revision": "34"}"#, true)
                .is_err()
        );
        assert_eq!(
            doc(&[r#"{ "msg": "a -> b" }"#]).check(r#"{"msg": "a -\u003e b"}"#, true),
            Ok(())
        );
    }

    #[test]
    fn errors_need_their_code_and_message() {
        let expected = doc(&["Code: PermissionDenied   Message: token lacks scope `…`"]);
        assert_eq!(expected.exit_status(), 71);
        let output =
            "ERROR:\n  Code: PermissionDenied\n  Message: token lacks scope `limiter.admin`\n";
        assert_eq!(expected.check(output, true), Ok(()));
        assert!(
            expected
                .check(
                    "ERROR:\n  Code: NotFound\n  Message: token lacks scope `x`",
                    true
                )
                .is_err()
        );
        assert_eq!(
            doc(&["ERROR:", "  Code: Unauthenticated", "  Message: m"]).exit_status(),
            80
        );
    }

    #[test]
    fn plain_lines_match_exactly_when_whole() {
        let expected = doc(&["a", "b …"]);
        assert_eq!(expected.check("a\nb c\n", true), Ok(()));
        assert!(expected.check("a\nb c\nd\n", true).is_err());
        assert_eq!(expected.check("x\na\ny\nb c\nd\n", false), Ok(()));
    }
}
