//! `LayerStream`: load stage i+1 on a background thread while stage i runs.
//!
//! The stream hands out loaded stages in order. With a prefetch depth `d > 0`, a loader
//! thread works ahead of the consumer, but never more than `d` stages: at most `d + 1`
//! stages are alive at once (the one running, and up to `d` loaded or loading), which is
//! what the memory planner budgets. With depth 0 each stage loads on the caller's thread
//! when asked for, and only one is ever alive.
//!
//! A byte budget ([`LayerStream::with_budget`]) bounds the look-ahead further: the loader
//! starts a stage only when the stages alive plus that one fit, so a large stage (an
//! embedding matrix, an LM head) is read when its neighbour is gone instead of beside it.
//! Each stage comes with a [`StageLease`]: its bytes count until the lease drops, so a
//! consumer that forgets a stage (or fails half way) cannot stall the loader.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

/// Stages loaded in order, optionally ahead of use on a background thread.
pub struct LayerStream<T, E> {
    source: Source<T, E>,
    next_index: usize,
    count: usize,
    budget: Option<Arc<ByteBudget>>,
}

/// A stage's place in the stream's byte budget: the stage's bytes count until this drops.
///
/// Keep it as long as the stage's memory lives (drop it with the weights). Without a budget
/// it does nothing.
#[must_use = "dropping the lease at once frees the stage's budget while it is still in memory"]
#[derive(Debug)]
pub struct StageLease {
    budget: Option<Arc<ByteBudget>>,
    index: usize,
}

impl Drop for StageLease {
    fn drop(&mut self) {
        if let Some(budget) = &self.budget {
            budget.release(self.index);
        }
    }
}

/// Bytes of the stages alive, against a limit the loader waits on.
#[derive(Debug)]
struct ByteBudget {
    limit: u64,
    sizes: Vec<u64>,
    alive: Mutex<u64>,
    freed: Condvar,
    /// Set when the stream drops, so a loader waiting for room gives up. (Leases may
    /// outlive the stream, so their references to the budget say nothing about it.)
    closed: AtomicBool,
}

impl ByteBudget {
    /// Waits until stage `index` fits beside the stages alive (a stage always fits when
    /// none is alive), then counts it. Returns false if the stream was dropped meanwhile.
    fn acquire(&self, index: usize) -> bool {
        let size = self.sizes.get(index).copied().unwrap_or(0);
        let mut alive = self.alive.lock().unwrap_or_else(PoisonError::into_inner);
        while *alive > 0 && *alive + size > self.limit {
            if self.closed.load(Ordering::Acquire) {
                return false;
            }
            alive = self
                .freed
                .wait(alive)
                .unwrap_or_else(PoisonError::into_inner);
        }
        *alive += size;
        true
    }

    /// Counts stage `index` without waiting: with no loader thread only the caller could
    /// free room, so waiting would never end.
    fn admit(&self, index: usize) {
        let size = self.sizes.get(index).copied().unwrap_or(0);
        *self.alive.lock().unwrap_or_else(PoisonError::into_inner) += size;
    }

    fn close(&self) {
        // Under the lock, so a loader between its check and its wait cannot miss the wakeup.
        let _alive = self.alive.lock().unwrap_or_else(PoisonError::into_inner);
        self.closed.store(true, Ordering::Release);
        self.freed.notify_all();
    }

    fn release(&self, index: usize) {
        // Called from `StageLease::drop`, which may run while unwinding: never panic.
        let size = self.sizes.get(index).copied().unwrap_or(0);
        let mut alive = self.alive.lock().unwrap_or_else(PoisonError::into_inner);
        *alive = alive.saturating_sub(size);
        self.freed.notify_all();
    }
}

enum Source<T, E> {
    /// Depth 0: load on demand.
    Inline(Box<dyn FnMut(usize) -> Result<T, E> + Send>),
    /// Depth > 0: a loader thread sends stages through a bounded channel.
    Prefetch {
        receiver: Option<Receiver<Result<T, E>>>,
        loader: Option<JoinHandle<()>>,
    },
}

impl<T: Send + 'static, E: Send + 'static> LayerStream<T, E> {
    /// A stream of `count` stages, each made by `load(index)`, working `depth` stages ahead.
    /// Fails only if the operating system refuses to start the loader thread.
    ///
    /// ```
    /// use memwise_model::stream::LayerStream;
    ///
    /// let mut stream = LayerStream::new(3, 1, |i| Ok::<_, String>(vec![i as f32; 4]))?;
    /// let mut seen = Vec::new();
    /// while let Some(stage) = stream.next_stage() {
    ///     let (weights, _lease) = stage.unwrap();
    ///     seen.push(weights[0]);
    /// }
    /// assert_eq!(seen, [0.0, 1.0, 2.0]);
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn new(
        count: usize,
        depth: usize,
        load: impl FnMut(usize) -> Result<T, E> + Send + 'static,
    ) -> std::io::Result<Self> {
        Self::with_budget(count, depth, None, load)
    }

    /// Like [`LayerStream::new`], and with `budget = Some((limit, sizes))` the loader also
    /// keeps the bytes of the stages alive within `limit`, stage `i` counting `sizes[i]`
    /// from when its load starts until its [`StageLease`] drops.
    ///
    /// ```
    /// use memwise_model::stream::LayerStream;
    ///
    /// // Stage 1 is large: it is not read while stage 0 is alive.
    /// let sizes = vec![60, 80, 10];
    /// let mut stream = LayerStream::with_budget(3, 2, Some((100, sizes)), |i| Ok::<_, ()>(i))?;
    /// while let Some(stage) = stream.next_stage() {
    ///     let (index, lease) = stage.unwrap();
    ///     // ... run stage `index`; dropping its weights and lease admits the next:
    ///     drop(lease);
    /// }
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn with_budget(
        count: usize,
        depth: usize,
        budget: Option<(u64, Vec<u64>)>,
        mut load: impl FnMut(usize) -> Result<T, E> + Send + 'static,
    ) -> std::io::Result<Self> {
        let budget = budget.map(|(limit, sizes)| {
            Arc::new(ByteBudget {
                limit,
                sizes,
                alive: Mutex::new(0),
                freed: Condvar::new(),
                closed: AtomicBool::new(false),
            })
        });
        let source = if depth == 0 {
            Source::Inline(Box::new(load))
        } else {
            // The loader holds one finished stage while blocked in `send`, and the channel
            // holds `depth - 1`: `depth` stages ahead of the consumer in all.
            let (sender, receiver): (SyncSender<Result<T, E>>, _) = mpsc::sync_channel(depth - 1);
            let loader_budget = budget.clone();
            let loader = std::thread::Builder::new()
                .name("memwise-prefetch".into())
                .spawn(move || {
                    for index in 0..count {
                        if let Some(budget) = &loader_budget {
                            if !budget.acquire(index) {
                                return;
                            }
                        }
                        let stage = load(index);
                        let failed = stage.is_err();
                        // A closed channel means the consumer stopped early: stop loading.
                        if sender.send(stage).is_err() || failed {
                            return;
                        }
                    }
                })?;
            Source::Prefetch {
                receiver: Some(receiver),
                loader: Some(loader),
            }
        };
        Ok(LayerStream {
            source,
            next_index: 0,
            count,
            budget,
        })
    }

    /// The next stage in order, with the lease that keeps its bytes counted against the
    /// budget until it drops; `None` after the last stage or after an error was returned.
    pub fn next_stage(&mut self) -> Option<Result<(T, StageLease), E>> {
        if self.next_index >= self.count {
            return None;
        }
        let index = self.next_index;
        self.next_index += 1;
        let stage = match &mut self.source {
            Source::Inline(load) => {
                if let Some(budget) = &self.budget {
                    budget.admit(index);
                }
                load(index)
            }
            Source::Prefetch { receiver, .. } => match receiver.as_ref()?.recv() {
                Ok(stage) => stage,
                // The loader died without sending: it panicked. Surface that as the end.
                Err(_) => {
                    self.next_index = self.count;
                    return None;
                }
            },
        };
        let lease = StageLease {
            budget: self.budget.clone(),
            index,
        };
        match stage {
            Ok(stage) => Some(Ok((stage, lease))),
            Err(error) => {
                self.next_index = self.count;
                Some(Err(error))
            }
        }
    }

    /// Stages not yet handed out.
    pub fn remaining(&self) -> usize {
        self.count - self.next_index
    }
}

impl<T, E> Drop for LayerStream<T, E> {
    fn drop(&mut self) {
        if let Source::Prefetch { receiver, loader } = &mut self.source {
            // Closing the channel first makes a loader blocked in `send` return, so the join
            // cannot hang; joining means no prefetched stage outlives the stream.
            drop(receiver.take());
            // A loader waiting on the budget gives up once it is closed.
            if let Some(budget) = &self.budget {
                budget.close();
            }
            if let Some(loader) = loader.take() {
                let _ = loader.join();
            }
        }
    }
}

impl<T, E> std::fmt::Debug for LayerStream<T, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerStream")
            .field("next_index", &self.next_index)
            .field("count", &self.count)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc::Sender;
    use std::time::Duration;

    /// How long a gate waits for the loader before the test fails instead of hanging.
    const WATCHDOG: Duration = Duration::from_secs(20);

    /// Runs `test` on its own thread and fails if it has not finished within [`WATCHDOG`]:
    /// a regression that deadlocks the stream fails the test instead of hanging the run.
    fn within_watchdog(test: impl FnOnce() + Send + 'static) {
        let (done, finished) = mpsc::channel();
        let worker = std::thread::spawn(move || {
            test();
            let _ = done.send(());
        });
        match finished.recv_timeout(WATCHDOG) {
            Ok(()) => worker.join().unwrap(),
            // The test panicked: re-raise its panic.
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                std::panic::resume_unwind(worker.join().unwrap_err())
            }
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("the stream hung for {WATCHDOG:?}"),
        }
    }

    /// Waits until the loader has announced stage `index` on `loaded`.
    fn wait_for_load(loaded: &Receiver<usize>, seen: &mut usize, index: usize) {
        while *seen <= index {
            let got = loaded
                .recv_timeout(WATCHDOG)
                .unwrap_or_else(|_| panic!("stage {index} was never loaded"));
            assert_eq!(got, *seen, "stages load in order");
            *seen += 1;
        }
    }

    /// A stage that counts the stages alive at once, and a loader that announces each load.
    struct Stage {
        index: usize,
        alive: Arc<AtomicUsize>,
    }

    impl Drop for Stage {
        fn drop(&mut self) {
            self.alive.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn counting_loader(
        alive: Arc<AtomicUsize>,
        most: Arc<AtomicUsize>,
        announce: Sender<usize>,
    ) -> impl FnMut(usize) -> Result<Stage, String> + Send + 'static {
        move |index| {
            let now = alive.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            let _ = announce.send(index);
            Ok(Stage {
                index,
                alive: alive.clone(),
            })
        }
    }

    #[test]
    fn stages_arrive_in_order_with_at_most_depth_plus_one_alive() {
        for depth in [0, 1, 2, 3] {
            within_watchdog(move || {
                const COUNT: usize = 8;
                let alive = Arc::new(AtomicUsize::new(0));
                let most = Arc::new(AtomicUsize::new(0));
                let (announce, loaded) = mpsc::channel();
                let loader = counting_loader(alive.clone(), most.clone(), announce);
                let mut stream = LayerStream::new(COUNT, depth, loader).unwrap();
                let (mut order, mut seen) = (Vec::new(), 0);
                while let Some(stage) = stream.next_stage() {
                    let (stage, _lease) = stage.unwrap();
                    // Gate: hold this stage until the loader has run as far ahead as it may.
                    wait_for_load(&loaded, &mut seen, (stage.index + depth).min(COUNT - 1));
                    order.push(stage.index);
                }
                drop(stream);
                assert_eq!(order, (0..COUNT).collect::<Vec<_>>(), "depth {depth}");
                assert_eq!(most.load(Ordering::SeqCst), depth + 1, "depth {depth}");
                assert_eq!(
                    alive.load(Ordering::SeqCst),
                    0,
                    "a stage outlived the stream"
                );
            });
        }
    }

    #[test]
    fn a_byte_budget_keeps_large_stages_apart() {
        within_watchdog(|| {
            // The limit fits two small stages but never a large one beside anything else.
            const LIMIT: u64 = 100;
            let sizes: Vec<u64> = vec![10, 10, 90, 10, 10, 90, 10];
            let alive = Arc::new(AtomicUsize::new(0));
            let most = Arc::new(AtomicUsize::new(0));
            let (announce, loaded) = mpsc::channel();
            let (a, m, sz) = (alive.clone(), most.clone(), sizes.clone());
            let budget = Some((LIMIT, sizes.clone()));
            let mut stream = LayerStream::with_budget(sizes.len(), 3, budget, move |i| {
                let now = a.fetch_add(sz[i] as usize, Ordering::SeqCst) + sz[i] as usize;
                m.fetch_max(now, Ordering::SeqCst);
                let _ = announce.send(i);
                Ok::<_, ()>(i)
            })
            .unwrap();
            let (mut order, mut seen) = (Vec::new(), 0);
            while let Some(stage) = stream.next_stage() {
                let (i, lease) = stage.unwrap();
                // Gate: hold stage i until every later stage that fits beside it was read.
                let mut ahead = i;
                let mut bytes = sizes[i];
                while ahead + 1 < sizes.len() && ahead < i + 3 && bytes + sizes[ahead + 1] <= LIMIT
                {
                    ahead += 1;
                    bytes += sizes[ahead];
                }
                wait_for_load(&loaded, &mut seen, ahead);
                order.push(i);
                alive.fetch_sub(sizes[i] as usize, Ordering::SeqCst);
                drop(lease);
            }
            assert_eq!(order, (0..sizes.len()).collect::<Vec<_>>());
            assert_eq!(most.load(Ordering::SeqCst), 100, "two small or one large");
        });
    }

    #[test]
    fn a_dropped_stage_frees_its_budget() {
        within_watchdog(|| {
            // Each stage fills the budget: the next is read only once the last is dropped,
            // without any call but the drop.
            let budget = Some((10, vec![10, 10, 10]));
            let mut stream = LayerStream::with_budget(3, 2, budget, Ok::<_, ()>).unwrap();
            let mut order = Vec::new();
            while let Some(stage) = stream.next_stage() {
                order.push(stage.unwrap().0);
            }
            assert_eq!(order, [0, 1, 2]);
        });
    }

    #[test]
    fn a_held_stage_keeps_the_next_out_of_a_full_budget() {
        within_watchdog(|| {
            let (announce, loaded) = mpsc::channel();
            let budget = Some((10, vec![10, 10]));
            let mut stream = LayerStream::with_budget(2, 1, budget, move |i| {
                let _ = announce.send(i);
                Ok::<_, ()>(i)
            })
            .unwrap();
            let (first, lease) = stream.next_stage().unwrap().unwrap();
            assert_eq!((first, loaded.recv().unwrap()), (0, 0));
            let early = loaded.recv_timeout(Duration::from_millis(200));
            assert!(early.is_err(), "stage 1 was read beside stage 0: {early:?}");
            drop(lease);
            assert_eq!(stream.next_stage().unwrap().unwrap().0, 1);
        });
    }

    #[test]
    fn a_stream_waiting_on_its_budget_can_be_dropped() {
        within_watchdog(|| {
            let budget = Some((10, vec![10, 10, 10]));
            let mut stream = LayerStream::with_budget(3, 2, budget, Ok::<_, ()>).unwrap();
            let (first, _lease) = stream.next_stage().unwrap().unwrap();
            assert_eq!(first, 0);
            drop(stream); // the loader waits for stage 0's lease, still held here
        });
    }

    #[test]
    fn an_error_ends_the_stream() {
        let mut stream = LayerStream::new(5, 1, |i| if i == 2 { Err(i) } else { Ok(i) }).unwrap();
        let mut next = || stream.next_stage().map(|s| s.map(|(i, _lease)| i));
        assert_eq!(next(), Some(Ok(0)));
        assert_eq!(next(), Some(Ok(1)));
        assert_eq!(next(), Some(Err(2)));
        assert_eq!(next(), None);
    }

    #[test]
    fn dropping_early_stops_the_loader() {
        within_watchdog(|| {
            let loaded = Arc::new(AtomicUsize::new(0));
            let counter = loaded.clone();
            let mut stream = LayerStream::new(1000, 2, move |i| {
                counter.fetch_add(1, Ordering::SeqCst);
                Ok::<_, ()>(i)
            })
            .unwrap();
            assert_eq!(stream.next_stage().unwrap().unwrap().0, 0);
            drop(stream);
            // Joined on drop: no load can happen after this point.
            assert!(loaded.load(Ordering::SeqCst) <= 4, "the loader kept going");
        });
    }
}
