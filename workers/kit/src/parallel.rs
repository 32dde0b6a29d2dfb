//! Host work split over the cores, with results that do not depend on how many there are.
//!
//! Work is cut into fixed chunks (fixed by the data, never by the thread count) and each chunk
//! is computed the same way on whichever thread takes it, so a draw, a reference or a
//! measurement is bit for bit the same on 1 core or 16. Threads are scoped (no pool spinning
//! between calls: the backends' own pools need the cores while a worker computes), started
//! only when a call has enough work to pay for them.

use std::sync::atomic::{AtomicUsize, Ordering};

static THREADS: AtomicUsize = AtomicUsize::new(0);

/// How many threads host work may use: as set by [`set_threads`] (a worker: its share of the
/// cores, from the runner's hello), else `PEFT_COMPAT_HOST_THREADS`, else the machine's cores.
pub fn threads() -> usize {
    match THREADS.load(Ordering::Relaxed) {
        0 => {
            let n = std::env::var("PEFT_COMPAT_HOST_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|&n| n > 0)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            THREADS.store(n, Ordering::Relaxed);
            n
        }
        n => n,
    }
}

/// Use `n` threads (at least 1) from now on.
pub fn set_threads(n: usize) {
    THREADS.store(n.max(1), Ordering::Relaxed);
}

/// Below this many values of work a call stays on its own thread.
pub const MIN_PARALLEL: usize = 1 << 18;

/// `f(i, chunk)` for each `size`-long chunk of `data` (the last may be shorter), on up to
/// `threads` threads when `work` (values touched in all) is worth it; the results in chunk
/// order. Chunk `i` is the same slice whatever the thread count.
pub fn map_chunks<T: Send, R: Send>(
    data: &mut [T],
    size: usize,
    work: usize,
    threads: usize,
    f: impl Fn(usize, &mut [T]) -> R + Sync,
) -> Vec<R> {
    let mut chunks: Vec<(usize, &mut [T])> = data.chunks_mut(size.max(1)).enumerate().collect();
    let threads = if work < MIN_PARALLEL { 1 } else { threads };
    if threads <= 1 || chunks.len() <= 1 {
        return chunks.into_iter().map(|(i, c)| f(i, c)).collect();
    }
    let per = chunks.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .chunks_mut(per)
            .map(|group| {
                s.spawn(move || group.iter_mut().map(|(i, c)| f(*i, c)).collect::<Vec<R>>())
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}

/// `f(i, range)` for each `size`-long range of `0..len` (the last may be shorter), as
/// [`map_chunks`] splits a slice: for passes that only read.
pub fn map_ranges<R: Send>(
    len: usize,
    size: usize,
    work: usize,
    threads: usize,
    f: impl Fn(usize, std::ops::Range<usize>) -> R + Sync,
) -> Vec<R> {
    let size = size.max(1);
    let mut blocks = vec![(); len.div_ceil(size)];
    map_chunks(&mut blocks, 1, work, threads, |i, _| {
        f(i, i * size..((i + 1) * size).min(len))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_fixed_by_the_data() {
        for threads in [1, 2, 3, 8] {
            let mut v = vec![0usize; 1 << 19];
            let firsts = map_chunks(&mut v, 1000, 1 << 19, threads, |i, c| {
                c.iter_mut().for_each(|x| *x = i);
                i * 1000
            });
            assert_eq!(
                firsts,
                (0..v.len().div_ceil(1000))
                    .map(|i| i * 1000)
                    .collect::<Vec<_>>()
            );
            assert!(v.iter().enumerate().all(|(j, &x)| x == j / 1000));
        }
    }
}
