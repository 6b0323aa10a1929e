//! The guest console follower of `tidepool up`: it reads a console's recent text over and
//! over, prints the new lines (the `TIDEPOOL-` markers, or every line with `--console`),
//! announces when the guest reached its `/init`, and warns when that takes too long or the VM
//! stops.
//!
//! A source gives the console's recent text each time it is asked ([`ConsoleSource`]): the
//! VM's serial console ring through the manager ([`VmConsole`]), or a log file some other
//! program appends a console to ([`FileConsole`], e.g. QEMU's `-serial file:`). Either is a
//! bounded window, so new text is found after the tail printed last ([`console_delta`]).

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidepool_api::types::VmState;
use tidepool_api::ApiBackend;

use super::direct::GUEST_INIT_MARKER;
use crate::manager::VmManager;

/// How long the guest may take to print `TIDEPOOL-INIT-START` before `up` says it looks stuck.
pub const INIT_PATIENCE: Duration = Duration::from_secs(90);
/// How much of a console the follower looks at each time (the VM's ring keeps 64 KiB).
pub const CONSOLE_WINDOW: u64 = 64 << 10;
/// How much of the text printed last is kept to find the new part in the next read.
const TAIL_CHARS: usize = 256;

/// Where the follower reads a guest console.
pub trait ConsoleSource {
    /// The console's recent text now; `None` when it cannot be read this time (the follower
    /// tries again on its next poll).
    fn recent(&mut self) -> Option<String>;
    /// Whether the guest has stopped for good (the follower then ends).
    fn stopped(&mut self) -> bool;
}

/// The serial console of a VM of `manager`.
#[derive(Debug)]
pub struct VmConsole {
    /// The manager.
    pub manager: Arc<VmManager>,
    /// The VM.
    pub id: String,
}

impl ConsoleSource for VmConsole {
    fn recent(&mut self) -> Option<String> {
        self.manager
            .call(&self.id, |vm| vm.console())
            .ok()
            .flatten()
    }

    fn stopped(&mut self) -> bool {
        self.manager
            .get_vm(&self.id)
            .is_ok_and(|info| info.state == VmState::Stopped)
    }
}

/// A console log file that another program appends to: its last [`CONSOLE_WINDOW`] bytes.
/// A file that does not exist yet reads as nothing; it never counts as stopped.
#[derive(Debug, Clone)]
pub struct FileConsole {
    /// The file.
    pub path: PathBuf,
}

impl ConsoleSource for FileConsole {
    fn recent(&mut self) -> Option<String> {
        let mut f = std::fs::File::open(&self.path).ok()?;
        let len = f.metadata().ok()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(CONSOLE_WINDOW)))
            .ok()?;
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).ok()?;
        Some(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn stopped(&mut self) -> bool {
        false
    }
}

/// The new part of `now` after `seen` (the console log is a bounded ring, so match on the
/// tail printed last rather than on lengths).
pub fn console_delta<'a>(seen_tail: &str, now: &'a str) -> &'a str {
    if seen_tail.is_empty() {
        return now;
    }
    match now.rfind(seen_tail) {
        Some(i) => &now[i + seen_tail.len()..],
        None => now,
    }
}

/// Turns successive console reads into printed lines.
#[derive(Debug)]
pub struct ConsoleFollower<W: Write> {
    id: String,
    all: bool,
    t0: Instant,
    tail: String,
    partial: String,
    init_seen: bool,
    warned: bool,
    out: W,
}

impl<W: Write> ConsoleFollower<W> {
    /// A follower of VM `id`'s console (started at `t0`) printing to `out`: the `TIDEPOOL-`
    /// markers, or every line with `all`.
    pub fn new(id: &str, all: bool, t0: Instant, out: W) -> Self {
        ConsoleFollower {
            id: id.to_string(),
            all,
            t0,
            tail: String::new(),
            partial: String::new(),
            init_seen: false,
            warned: false,
            out,
        }
    }

    /// Whether the guest's `/init` has started.
    pub fn init_seen(&self) -> bool {
        self.init_seen
    }

    /// The output, back.
    pub fn into_output(self) -> W {
        self.out
    }

    /// Take in the console's text as read now: print its complete new lines (a line still
    /// being written waits for its newline).
    pub fn feed(&mut self, text: &str) {
        let delta = console_delta(&self.tail, text).to_string();
        self.tail = text
            .char_indices()
            .rev()
            .nth(TAIL_CHARS - 1)
            .map(|(i, _)| text[i..].to_string())
            .unwrap_or_else(|| text.to_string());
        self.partial.push_str(&delta);
        while let Some(nl) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=nl).collect();
            let line = line.trim_end();
            // Messages only: a closed stdout must not stop the follower.
            if self.all || line.contains("TIDEPOOL-") {
                let _ = writeln!(self.out, "  guest| {line}");
            }
            if !self.init_seen && line.contains("TIDEPOOL-INIT-START") {
                self.init_seen = true;
                let _ = writeln!(
                    self.out,
                    "{GUEST_INIT_MARKER} vm={} after={:.1}s (the guest's /init started)",
                    self.id,
                    self.t0.elapsed().as_secs_f64()
                );
            }
        }
        if !self.init_seen && !self.warned && self.t0.elapsed() > INIT_PATIENCE {
            self.warned = true;
            let _ = writeln!(
                self.out,
                "warning: the guest has not reached /init after {} s; if this host's KVM \
                 cannot run a stock kernel, stop with Ctrl-C and run `tidepool up --nested`",
                INIT_PATIENCE.as_secs()
            );
        }
        let _ = self.out.flush();
    }

    /// Say that the VM stopped.
    fn stopped(&mut self) {
        let _ = writeln!(
            self.out,
            "the VM {} stopped (the guest powered off or failed{}); the daemon keeps running",
            self.id,
            if self.init_seen { "" } else { " before /init" }
        );
        let _ = self.out.flush();
    }
}

/// Follow `source` every `poll` until `stop` is set or the guest stops; returns the follower
/// (with its output).
pub fn follow<S: ConsoleSource, W: Write>(
    mut source: S,
    mut follower: ConsoleFollower<W>,
    poll: Duration,
    stop: &AtomicBool,
) -> ConsoleFollower<W> {
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(poll);
        if let Some(text) = source.recent() {
            follower.feed(&text);
        }
        if source.stopped() {
            follower.stopped();
            break;
        }
    }
    follower
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn console_delta_follows_a_ring() {
        assert_eq!(console_delta("", "abc\n"), "abc\n");
        assert_eq!(console_delta("abc\n", "abc\ndef\n"), "def\n");
        // The ring dropped its head: the tail seen last is still found.
        assert_eq!(console_delta("c\nd", "b\nc\nde\n"), "e\n");
        // Nothing new.
        assert_eq!(console_delta("xyz", "wxyz"), "");
    }

    /// Output shared with the test while the follower thread owns its writer.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into()
        }
    }

    fn wait_for(out: &Shared, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !out.text().contains(what) {
            assert!(
                Instant::now() < deadline,
                "{what:?} never printed; output so far:\n{}",
                out.text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn append(path: &std::path::Path, text: &str) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("open log");
        f.write_all(text.as_bytes()).expect("append");
    }

    fn follow_file(all: bool) -> (String, String) {
        let dir = std::env::temp_dir().join(format!(
            "tp-console-{}-{}",
            std::process::id(),
            u8::from(all)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let log = dir.join("console.log");
        let out = Shared::default();
        let stop = Arc::new(AtomicBool::new(false));
        let follower = ConsoleFollower::new("vm7", all, Instant::now(), out.clone());
        let source = FileConsole { path: log.clone() };
        let stop2 = Arc::clone(&stop);
        let t = std::thread::spawn(move || {
            follow(source, follower, Duration::from_millis(10), &stop2).init_seen()
        });
        // The file appears after the follower started, and grows line by line.
        append(&log, "[    0.000000] Linux version 6.1\n");
        append(&log, "TIDEPOOL-BOOT modules loaded\n");
        wait_for(&out, "TIDEPOOL-BOOT modules loaded");
        // A line written in two pieces is printed once, whole, after its newline.
        append(&log, "TIDEPOOL-INIT-");
        std::thread::sleep(Duration::from_millis(50));
        assert!(!out.text().contains("TIDEPOOL-INIT-"), "{}", out.text());
        append(&log, "START pid 1\nplain line\n");
        wait_for(&out, GUEST_INIT_MARKER);
        append(&log, "TIDEPOOL-LAST\n");
        wait_for(&out, "TIDEPOOL-LAST");
        stop.store(true, Ordering::Relaxed);
        let init_seen = t.join().expect("follower");
        assert!(init_seen);
        let text = std::fs::read_to_string(&log).expect("log");
        let _ = std::fs::remove_dir_all(&dir);
        (out.text(), text)
    }

    #[test]
    fn follows_an_appended_log_file_and_prints_the_markers() {
        let (out, _) = follow_file(false);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "  guest| TIDEPOOL-BOOT modules loaded", "{out}");
        assert_eq!(lines[1], "  guest| TIDEPOOL-INIT-START pid 1", "{out}");
        assert!(
            lines[2].starts_with(&format!("{GUEST_INIT_MARKER} vm=vm7 after=")),
            "{out}"
        );
        assert_eq!(lines[3], "  guest| TIDEPOOL-LAST", "{out}");
        assert_eq!(lines.len(), 4, "each line once, no kernel log: {out}");
    }

    #[test]
    fn with_all_it_prints_every_new_line_once() {
        let (out, log) = follow_file(true);
        let printed: Vec<&str> = out
            .lines()
            .filter_map(|l| l.strip_prefix("  guest| "))
            .collect();
        let written: Vec<&str> = log.lines().collect();
        assert_eq!(printed, written, "{out}");
    }
}
