//! The commands of a Markdown document: its fenced blocks, the `docs-test` markers before
//! them, and each `sh` block cut into commands with the `# …` lines documenting their output.

/// A fenced block of a document, with what the test needs to know to run or check it.
#[derive(Debug)]
pub struct Block {
    /// `README.md:163`: where the opening fence is, for messages.
    pub place: String,
    /// The fence's info string: `sh`, or empty for a plain block.
    pub lang: String,
    /// The `<!-- docs-test: … -->` markers just above the fence, in order.
    pub markers: Vec<Marker>,
    /// The block's lines, between the fences.
    pub lines: Vec<String>,
    /// For `sh` blocks: the commands, in order.
    pub commands: Vec<Command>,
}

/// One command of an `sh` block: a line, with its `\` continuations and heredoc body.
#[derive(Debug, Clone)]
pub struct Command {
    /// `README.md:181`: the command's first line, for messages.
    pub place: String,
    /// The command as the document shows it (after the test's substitutions).
    pub text: String,
    /// The `# …` lines right below it (without the `# `): its documented output.
    pub documented: Vec<String>,
}

/// What a `<!-- docs-test: … -->` comment says about the block below it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Marker {
    /// `skip (why)`: not run; the reason is required.
    Skip(String),
    /// `terminal NAME[, answers later][, keeps running]`: the block runs in a terminal of
    /// its own beside the main shell.
    Terminal {
        name: String,
        /// Go on at once instead of waiting for the documented output (it comes after a
        /// later command, e.g. an Acquire waiting for a Release).
        answers_later: bool,
        /// Its last command may still be running when the tour ends (a watch with
        /// `-max-time 300`); it is then stopped.
        keeps_running: bool,
    },
    /// `type "KEYS" into NAME[ on "TEXT"][ and wait for it to end]`: keys typed into a
    /// terminal — before the block, or while it runs once the terminal printed TEXT.
    Type {
        keys: String,
        into: String,
        on: Option<String>,
        wait_for_end: bool,
    },
    /// `eventually`: each command is retried (for a few seconds) until it gives its
    /// documented result — for effects documented as taking up to a second.
    Eventually,
    /// `output of NAME`: the lines of this plain block appear in terminal NAME's output.
    OutputOf(String),
}

const MARKER_START: &str = "<!-- docs-test:";

/// The fenced blocks of `text` (the document `file`) whose opening fence lies in a section
/// `wanted` accepts (it gets the current `## ` heading), with their markers. A marker not
/// followed by a fence, or one the test does not know, is an error.
pub fn blocks(file: &str, text: &str, wanted: impl Fn(&str) -> bool) -> Result<Vec<Block>, String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut blocks = Vec::new();
    let mut heading = String::new();
    let mut markers: Vec<(usize, Marker)> = Vec::new();
    let mut index = 0;
    while index < lines.len() {
        let line = lines[index];
        if let Some(title) = line.strip_prefix("## ") {
            heading = title.trim().to_owned();
        }
        if line.trim_start().starts_with(MARKER_START) {
            markers.push((index + 1, marker(file, index + 1, line)?));
        } else if let Some(lang) = line.strip_prefix("```") {
            let place = format!("{file}:{}", index + 1);
            let end = (index + 1..lines.len())
                .find(|&i| lines[i].trim_end() == "```")
                .ok_or_else(|| format!("{place}: the block is never closed"))?;
            let body: Vec<String> = lines[index + 1..end]
                .iter()
                .map(|l| l.to_string())
                .collect();
            if wanted(&heading) {
                let lang = lang.trim().to_owned();
                let commands = if lang == "sh" {
                    commands(file, index + 2, &body)?
                } else {
                    Vec::new()
                };
                blocks.push(Block {
                    place,
                    lang,
                    markers: markers.drain(..).map(|(_, m)| m).collect(),
                    lines: body,
                    commands,
                });
            }
            markers.clear();
            index = end;
        } else if !line.trim().is_empty() && !markers.is_empty() {
            let (at, _) = markers[0];
            return Err(format!(
                "{file}:{at}: a docs-test marker must come just before a ``` block"
            ));
        }
        index += 1;
    }
    Ok(blocks)
}

fn marker(file: &str, number: usize, line: &str) -> Result<Marker, String> {
    let bad = |why: &str| format!("{file}:{number}: {why}: {line}");
    let body = line
        .trim()
        .strip_prefix(MARKER_START)
        .and_then(|rest| rest.strip_suffix("-->"))
        .ok_or_else(|| bad("a docs-test marker is one line, `<!-- docs-test: … -->`"))?
        .trim();
    if let Some(reason) = body.strip_prefix("skip") {
        let reason = reason.trim();
        return match reason.strip_prefix('(').and_then(|r| r.strip_suffix(')')) {
            Some(why) if !why.trim().is_empty() => Ok(Marker::Skip(why.trim().to_owned())),
            _ => Err(bad("`skip` needs a reason in parentheses")),
        };
    }
    if body == "eventually" {
        return Ok(Marker::Eventually);
    }
    if let Some(name) = body.strip_prefix("output of ") {
        return Ok(Marker::OutputOf(name.trim().to_owned()));
    }
    if let Some(rest) = body.strip_prefix("terminal ") {
        let mut parts = rest.split(',').map(str::trim);
        let name = parts.next().unwrap_or_default().to_owned();
        let (mut answers_later, mut keeps_running) = (false, false);
        for part in parts {
            match part {
                "answers later" => answers_later = true,
                "keeps running" => keeps_running = true,
                _ => {
                    return Err(bad(
                        "a terminal takes `answers later` and `keeps running` only",
                    ));
                }
            }
        }
        if name.is_empty() || name.contains(' ') {
            return Err(bad("a terminal needs a one-word name"));
        }
        return Ok(Marker::Terminal {
            name,
            answers_later,
            keeps_running,
        });
    }
    if let Some(rest) = body.strip_prefix("type ") {
        let (keys, rest) = quoted(rest).ok_or_else(|| bad("`type` needs the keys in quotes"))?;
        let rest = rest
            .trim_start()
            .strip_prefix("into ")
            .ok_or_else(|| bad("`type \"…\" into NAME`"))?;
        let (into, mut rest) = rest
            .trim_start()
            .split_once(' ')
            .unwrap_or((rest.trim(), ""));
        let mut on = None;
        if let Some(after) = rest.trim_start().strip_prefix("on ") {
            let (text, after) =
                quoted(after).ok_or_else(|| bad("`on` needs the text in quotes"))?;
            on = Some(text);
            rest = after;
        }
        let wait_for_end = match rest.trim() {
            "" => false,
            "and wait for it to end" => true,
            _ => {
                return Err(bad(
                    "after `type \"…\" into NAME` come `on \"…\"` and `and wait for it to end`",
                ));
            }
        };
        return Ok(Marker::Type {
            keys,
            into: into.to_owned(),
            on,
            wait_for_end,
        });
    }
    Err(bad(
        "unknown docs-test marker (see integration/tests/suite/docs_commands.rs)",
    ))
}

/// `"text" rest` → (`text`, ` rest`).
fn quoted(text: &str) -> Option<(String, &str)> {
    let inner = text.trim_start().strip_prefix('"')?;
    let end = inner.find('"')?;
    Some((inner[..end].to_owned(), &inner[end + 1..]))
}

/// Cuts an `sh` block (its first line is line `first` of `file`) into commands. A line
/// starting with `#` documents the output of the command above it; a blank line, or a line
/// that does not continue the previous one, starts a new command.
fn commands(file: &str, first: usize, body: &[String]) -> Result<Vec<Command>, String> {
    let mut commands: Vec<Command> = Vec::new();
    let mut open = false; // the last command goes on (a trailing `\`)
    let mut index = 0;
    while index < body.len() {
        let line = &body[index];
        let number = first + index;
        index += 1;
        if line.trim().is_empty() {
            open = false;
        } else if let Some(doc) = line.strip_prefix('#').filter(|_| !open) {
            let command = commands
                .last_mut()
                .ok_or_else(|| format!("{file}:{number}: documented output before any command"))?;
            command
                .documented
                .push(doc.strip_prefix(' ').unwrap_or(doc).to_owned());
        } else {
            if open {
                let command = commands.last_mut().expect("an open command exists");
                command.text.push('\n');
                command.text.push_str(line);
            } else {
                commands.push(Command {
                    place: format!("{file}:{number}"),
                    text: line.clone(),
                    documented: Vec::new(),
                });
            }
            open = line.trim_end().ends_with('\\');
            if let Some(word) = heredoc_word(line) {
                let end = (index..body.len())
                    .find(|&i| body[i].trim() == word)
                    .ok_or_else(|| format!("{file}:{number}: heredoc `{word}` never ends"))?;
                let command = commands.last_mut().expect("just pushed or extended");
                for body_line in &body[index..=end] {
                    command.text.push('\n');
                    command.text.push_str(body_line);
                }
                index = end + 1;
            }
        }
    }
    Ok(commands)
}

/// The terminator of a heredoc opened on this line (`<<'XML'`, `<<XML`, `<<-XML`).
fn heredoc_word(line: &str) -> Option<String> {
    let (_, after) = line.split_once("<<")?;
    let word: String = after
        .trim_start_matches('-')
        .trim_start_matches(['\'', '"'])
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    (!word.is_empty()).then_some(word)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_commands_with_continuations_heredocs_and_documented_output() {
        let text = "## Tour\n<!-- docs-test: terminal watcher, keeps running -->\n```sh\n\
            grpcurl a \\\n    b\n# { \"x\": 1 }\nKEY=…   # the keyId\n\
            cat >f <<'XML'\n# not output\nXML\n```\n";
        let blocks = blocks("T.md", text, |h| h == "Tour").unwrap();
        assert_eq!(blocks.len(), 1);
        let block = &blocks[0];
        assert_eq!(
            block.markers,
            [Marker::Terminal {
                name: "watcher".into(),
                answers_later: false,
                keeps_running: true
            }]
        );
        let texts: Vec<_> = block.commands.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(
            texts,
            [
                "grpcurl a \\\n    b",
                "KEY=…   # the keyId",
                "cat >f <<'XML'\n# not output\nXML"
            ]
        );
        assert_eq!(block.commands[0].documented, ["{ \"x\": 1 }"]);
        assert_eq!(block.commands[0].place, "T.md:4");
    }

    #[test]
    fn parses_typing_markers_and_refuses_unknown_ones() {
        let typed = marker(
            "T.md",
            1,
            r#"<!-- docs-test: type "q" into softphone and wait for it to end -->"#,
        );
        assert_eq!(
            typed.unwrap(),
            Marker::Type {
                keys: "q".into(),
                into: "softphone".into(),
                on: None,
                wait_for_end: true
            }
        );
        let on = marker(
            "T.md",
            1,
            r#"<!-- docs-test: type "a" into softphone on "offer CM_1 " -->"#,
        );
        assert_eq!(
            on.unwrap(),
            Marker::Type {
                keys: "a".into(),
                into: "softphone".into(),
                on: Some("offer CM_1 ".into()),
                wait_for_end: false
            }
        );
        assert!(marker("T.md", 1, "<!-- docs-test: skip -->").is_err());
        assert!(marker("T.md", 1, "<!-- docs-test: run twice -->").is_err());
        let stray = blocks(
            "T.md",
            "<!-- docs-test: eventually -->\ntext\n```sh\nls\n```\n",
            |_| true,
        );
        assert!(stray.is_err());
    }
}
