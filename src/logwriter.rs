//! The process's log and usage-line writer: callers append whole lines to a shared buffer (a
//! lock and a copy, no system call), and one background thread writes what has gathered, at
//! most every [`LINGER`], in one write. A channel per line (what `tracing-appender` does) costs
//! a futex wake-up per line once the writer thread sleeps between lines: at tens of thousands
//! of requests a second, that thread and the wake-ups took ~10 % of the gateway's CPU
//! (BENCHMARKS.md).
//!
//! Nothing is dropped: when [`CAP`] bytes are waiting, writers wait for the thread to take
//! them. Lines stay whole (each `write` call is appended at once). Dropping the
//! [`FlushGuard`] writes everything still buffered and stops the thread.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the thread lets lines gather after the first one arrives.
pub const LINGER: Duration = Duration::from_millis(10);

/// Bytes waiting at which writers block until the thread catches up.
pub const CAP: usize = 8 << 20;

#[derive(Default)]
struct State {
    buf: Vec<u8>,
    /// The thread waits for a first line (writers wake it on an empty → non-empty change).
    idle: bool,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the writing thread.
    work: Condvar,
    /// Wakes writers waiting for room.
    room: Condvar,
    cap: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A writer that panicked mid-append left at worst a partial line; keep logging.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A cloneable handle that appends to the shared buffer.
#[derive(Clone)]
pub struct BatchWriter(Arc<Shared>);

/// Flushes and stops the writing thread when dropped.
pub struct FlushGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl BatchWriter {
    /// Starts the thread that writes to `out`.
    pub fn spawn<W: Write + Send + 'static>(out: W) -> io::Result<(BatchWriter, FlushGuard)> {
        BatchWriter::spawn_with(out, CAP, LINGER)
    }

    fn spawn_with<W: Write + Send + 'static>(
        mut out: W,
        cap: usize,
        linger: Duration,
    ) -> io::Result<(BatchWriter, FlushGuard)> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            room: Condvar::new(),
            cap,
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fuke-log".into())
            .spawn(move || {
                let mut spare = Vec::new();
                loop {
                    let mut st = s.lock();
                    while st.buf.is_empty() && !st.stop {
                        st.idle = true;
                        st = s.work.wait(st).unwrap_or_else(|e| e.into_inner());
                    }
                    st.idle = false;
                    if !st.stop && st.buf.len() < s.cap / 2 {
                        // Let the lines of the next few milliseconds join this write.
                        drop(st);
                        std::thread::sleep(linger);
                        st = s.lock();
                    }
                    let stop = st.stop;
                    std::mem::swap(&mut st.buf, &mut spare);
                    drop(st);
                    s.room.notify_all();
                    if !spare.is_empty() {
                        // Nowhere to report a failing stderr; keep going.
                        let _ = out.write_all(&spare);
                        let _ = out.flush();
                    }
                    if spare.capacity() > 1 << 20 {
                        spare = Vec::new();
                    } else {
                        spare.clear();
                    }
                    if stop && s.lock().buf.is_empty() {
                        return;
                    }
                }
            })?;
        Ok((
            BatchWriter(shared.clone()),
            FlushGuard {
                shared,
                thread: Some(thread),
            },
        ))
    }
}

impl Write for BatchWriter {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        (&*self).write(line)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes through a shared reference, so that a writer kept in a shared sink needs no clone of
/// its handle per line.
impl Write for &BatchWriter {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let s = &self.0;
        let mut st = s.lock();
        while st.buf.len() >= s.cap && !st.stop {
            st = s.room.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.buf.extend_from_slice(line);
        if st.idle {
            st.idle = false;
            drop(st);
            s.work.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchWriter {
    type Writer = &'a BatchWriter;

    fn make_writer(&'a self) -> &'a BatchWriter {
        self
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.work.notify_one();
        self.shared.room.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that records each `write` call separately.
    #[derive(Clone, Default)]
    struct Calls(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Calls {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().push(b.to_vec());
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_arrives_whole_in_order_and_in_few_writes() {
        let sink = Calls::default();
        let (w, guard) = BatchWriter::spawn_with(sink.clone(), CAP, LINGER).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let mut w = w.clone();
                std::thread::spawn(move || {
                    for i in 0..5000 {
                        w.write_all(format!("thread {t} line {i}\n").as_bytes())
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let calls = sink.0.lock().unwrap();
        let all: Vec<u8> = calls.concat();
        let text = String::from_utf8(all).unwrap();
        let mut next = [0usize; 4];
        for line in text.lines() {
            let parts: Vec<&str> = line.split(' ').collect();
            assert_eq!(parts.len(), 4, "a whole line: {line:?}");
            let (t, i): (usize, usize) = (parts[1].parse().unwrap(), parts[3].parse().unwrap());
            assert_eq!(i, next[t], "thread {t}'s lines in order");
            next[t] += 1;
        }
        assert_eq!(next, [5000; 4], "nothing lost, flushed on drop");
        assert!(
            calls.len() < 2000,
            "20,000 lines took {} writes",
            calls.len()
        );
    }

    #[test]
    fn a_full_buffer_makes_writers_wait_instead_of_dropping() {
        /// A slow disk: every write takes 5 ms.
        #[derive(Clone, Default)]
        struct Slow(Arc<Mutex<usize>>);
        impl Write for Slow {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                std::thread::sleep(Duration::from_millis(5));
                *self.0.lock().unwrap() += b.len();
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let sink = Slow::default();
        let (mut w, guard) =
            BatchWriter::spawn_with(sink.clone(), 1024, Duration::from_millis(1)).unwrap();
        let line = [b'x'; 99];
        let mut peak = 0;
        for _ in 0..500 {
            w.write_all(&line).unwrap();
            w.write_all(b"\n").unwrap();
            peak = peak.max(w.0.lock().buf.len());
        }
        // Bounded: at most the cap plus one write's worth waits in memory.
        assert!(peak <= 1024 + 100, "peak buffer {peak}");
        drop(guard);
        assert_eq!(*sink.0.lock().unwrap(), 500 * 100);
    }
}
