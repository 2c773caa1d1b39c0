//! The process's log and usage-line writer: callers append whole lines to a buffer (a lock and
//! a copy, no system call), and one background thread writes what has gathered, at most every
//! [`LINGER`], in one write. A channel per line (what `tracing-appender` does) costs a futex
//! wake-up per line once the writer thread sleeps between lines: at tens of thousands of
//! requests a second, that thread and the wake-ups took ~10 % of the gateway's CPU
//! (BENCHMARKS.md).
//!
//! The buffer is sharded by thread: each thread appends to its own shard, so the lock and the
//! buffer's tail stay in the cache of the core that writes them instead of moving between
//! cores on every line (one shared lock did: BENCHMARKS.md, run 9). A thread's lines stay in
//! the order it wrote them; lines of different threads that gathered in the same write are
//! grouped by shard, so they may be out of time order by at most [`LINGER`].
//!
//! Nothing is dropped: when a shard holds its share of [`CAP`] bytes, its writers wait for the
//! thread to take them. Lines stay whole (each `write` call is appended at once). Dropping the
//! [`FlushGuard`] writes everything still buffered and stops the thread.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the thread lets lines gather after the first one arrives.
pub const LINGER: Duration = Duration::from_millis(10);

/// Bytes waiting (all shards together) at which writers block until the thread catches up.
pub const CAP: usize = 8 << 20;

/// Shards of the buffer. Threads take them in turn as they first write; more threads than
/// shards share them, which is still correct.
const SHARDS: usize = 16;

/// One thread's part of the buffer, on cache lines of its own.
#[repr(align(128))]
#[derive(Default)]
struct Shard {
    buf: Mutex<Vec<u8>>,
    /// Wakes this shard's writers waiting for room.
    room: Condvar,
}

struct Shared {
    shards: Box<[Shard]>,
    /// Set while the thread waits for a first line: a writer that sees it takes `ctrl` and
    /// wakes the thread. Written only when the thread goes to sleep or wakes.
    idle: AtomicBool,
    stop: AtomicBool,
    /// Held by the thread from setting `idle` until it waits, so that no wake-up is lost.
    ctrl: Mutex<()>,
    /// Wakes the writing thread.
    work: Condvar,
    /// Bytes one shard may hold before its writers wait.
    shard_cap: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A writer that panicked mid-append left at worst a partial line; keep logging.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The shard of the calling thread.
fn this_threads_shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local!(static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS);
    SHARD.with(|s| *s)
}

impl Shared {
    /// Waits until a shard holds something or the writer is stopped; says whether it stopped.
    fn wait_for_work(&self) -> bool {
        let mut ctrl = lock(&self.ctrl);
        loop {
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            self.idle.store(true, Ordering::SeqCst);
            if self.shards.iter().any(|s| !lock(&s.buf).is_empty()) {
                break;
            }
            ctrl = self.work.wait(ctrl).unwrap_or_else(|e| e.into_inner());
        }
        self.idle.store(false, Ordering::SeqCst);
        self.stop.load(Ordering::SeqCst)
    }

    /// Moves every shard's lines to the end of `out`, in shard order, and lets their waiting
    /// writers go on.
    fn take_all(&self, out: &mut Vec<u8>) {
        for shard in self.shards.iter() {
            let mut buf = lock(&shard.buf);
            if !buf.is_empty() {
                out.extend_from_slice(&buf);
                buf.clear();
                if buf.capacity() > 2 * self.shard_cap.max(1 << 16) {
                    *buf = Vec::new();
                }
            }
            drop(buf);
            shard.room.notify_all();
        }
    }

    fn fullest(&self) -> usize {
        self.shards
            .iter()
            .map(|s| lock(&s.buf).len())
            .max()
            .unwrap_or(0)
    }
}

/// A cloneable handle that appends to the buffer.
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
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            idle: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            ctrl: Mutex::new(()),
            work: Condvar::new(),
            shard_cap: (cap / SHARDS).max(1),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fuke-log".into())
            .spawn(move || {
                let mut spare = Vec::new();
                loop {
                    let stop = s.wait_for_work();
                    if !stop && s.fullest() < s.shard_cap / 2 {
                        // Let the lines of the next few milliseconds join this write.
                        std::thread::sleep(linger);
                    }
                    s.take_all(&mut spare);
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
                    if stop && s.fullest() == 0 {
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

    /// Bytes waiting in all shards.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.0.shards.iter().map(|s| lock(&s.buf).len()).sum()
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
        let shard = &s.shards[this_threads_shard()];
        let mut buf = lock(&shard.buf);
        while buf.len() >= s.shard_cap && !s.stop.load(Ordering::Acquire) {
            buf = shard.room.wait(buf).unwrap_or_else(|e| e.into_inner());
        }
        buf.extend_from_slice(line);
        drop(buf);
        if s.idle.load(Ordering::SeqCst) {
            let _ctrl = lock(&s.ctrl);
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
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _ctrl = lock(&self.shared.ctrl);
            self.shared.work.notify_one();
        }
        for shard in self.shared.shards.iter() {
            let _buf = lock(&shard.buf);
            shard.room.notify_all();
        }
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
    fn lines_written_after_the_thread_went_idle_are_written_without_a_flush() {
        let sink = Calls::default();
        let (mut w, _guard) =
            BatchWriter::spawn_with(sink.clone(), CAP, Duration::from_millis(1)).unwrap();
        for i in 0..20 {
            // From a new thread each time, so that different shards wake the thread.
            let mut wt = w.clone();
            std::thread::spawn(move || wt.write_all(format!("burst {i}\n").as_bytes()).unwrap())
                .join()
                .unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                let text = String::from_utf8(sink.0.lock().unwrap().concat()).unwrap();
                if text.contains(&format!("burst {i}\n")) {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "line {i} still waiting: the writing thread was not woken"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            // Long enough for the thread to find every shard empty and wait again.
            std::thread::sleep(Duration::from_millis(20));
        }
        w.write_all(b"last\n").unwrap();
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
            peak = peak.max(w.waiting());
        }
        // Bounded: at most the cap plus one write's worth waits in memory.
        assert!(peak <= 1024 + 100, "peak buffer {peak}");
        drop(guard);
        assert_eq!(*sink.0.lock().unwrap(), 500 * 100);
    }
}
