//! Commands from stdin: single keys from a terminal (put in non-canonical, no-echo mode so
//! a key acts without Enter; Ctrl-C still interrupts), or the same letters from a pipe, so
//! a script can drive the softphone (`(sleep 2; echo a) | softphone …`).

use std::io::{IsTerminal, Read};

use rustix::termios::{self, LocalModes, OptionalActions, SpecialCodeIndex, Termios};
use tokio::sync::mpsc;

use crate::Command;

/// The terminal's settings before [`KeyInput::start`] changed them; restored when dropped.
#[derive(Debug)]
pub struct TerminalGuard {
    original: Termios,
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin(), OptionalActions::Now, &self.original);
    }
}

/// Reads commands from stdin on a thread of its own.
#[derive(Debug)]
pub struct KeyInput {
    /// The commands, in the order typed; closes at the end of stdin.
    pub commands: mpsc::Receiver<Command>,
    /// Set when stdin is a terminal whose mode was changed; keep it alive while reading.
    pub terminal: Option<TerminalGuard>,
}

impl KeyInput {
    /// Starts reading stdin. A plain std thread (not `spawn_blocking`), because a read
    /// blocked on a terminal must not keep the runtime from shutting down.
    pub fn start() -> Self {
        let terminal = std::io::stdin()
            .is_terminal()
            .then(single_key_mode)
            .flatten();
        let (sender, commands) = mpsc::channel(16);
        std::thread::spawn(move || read_commands(&sender));
        Self { commands, terminal }
    }
}

/// Switches the terminal to key-at-a-time input without echo; the guard restores it.
fn single_key_mode() -> Option<TerminalGuard> {
    let original = termios::tcgetattr(std::io::stdin()).ok()?;
    let mut keys = original.clone();
    keys.local_modes
        .remove(LocalModes::ICANON | LocalModes::ECHO);
    keys.special_codes[SpecialCodeIndex::VMIN] = 1;
    keys.special_codes[SpecialCodeIndex::VTIME] = 0;
    termios::tcsetattr(std::io::stdin(), OptionalActions::Now, &keys).ok()?;
    Some(TerminalGuard { original })
}

fn read_commands(sender: &mpsc::Sender<Command>) {
    let mut stdin = std::io::stdin().lock();
    let mut buffer = [0u8; 64];
    loop {
        let read = match stdin.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        for command in parse(&buffer[..read]) {
            if sender.blocking_send(command).is_err() {
                return;
            }
        }
    }
}

/// The commands in typed bytes; anything else (newlines, spaces) is skipped.
fn parse(bytes: &[u8]) -> impl Iterator<Item = Command> + '_ {
    bytes
        .iter()
        .filter_map(|&byte| Command::from_key(char::from(byte)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn piped_lines_become_commands() {
        let commands: Vec<_> = parse(b"a\nh\n  s q\n").collect();
        assert_eq!(
            commands,
            [
                Command::Answer,
                Command::Hangup,
                Command::CycleStatus,
                Command::Quit
            ]
        );
    }
}
