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
//! The consumer says when a stage is gone with [`LayerStream::release`].

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

/// Bytes of the stages alive, against a limit the loader waits on.
struct ByteBudget {
    limit: u64,
    sizes: Vec<u64>,
    alive: Mutex<u64>,
    freed: Condvar,
}

impl ByteBudget {
    /// Waits until stage `index` fits beside the stages alive (a stage always fits when
    /// none is alive), then counts it. Returns false if the stream was dropped meanwhile.
    fn acquire(&self, index: usize, closed: &dyn Fn() -> bool) -> bool {
        let size = self.sizes.get(index).copied().unwrap_or(0);
        let mut alive = self.alive.lock().unwrap_or_else(PoisonError::into_inner);
        while *alive > 0 && *alive + size > self.limit {
            if closed() {
                return false;
            }
            alive = self
                .freed
                .wait_timeout(alive, std::time::Duration::from_millis(50))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        *alive += size;
        true
    }

    fn release(&self, index: usize) {
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
    /// use memwise_model::LayerStream;
    ///
    /// let mut stream = LayerStream::new(3, 1, |i| Ok::<_, String>(vec![i as f32; 4]))?;
    /// let mut seen = Vec::new();
    /// while let Some(stage) = stream.next_stage() {
    ///     seen.push(stage.unwrap()[0]);
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
    /// from when its load starts until [`LayerStream::release`]`(i)`.
    ///
    /// ```
    /// use memwise_model::LayerStream;
    ///
    /// // Stage 1 is large: it is not read while stage 0 is alive.
    /// let sizes = vec![60, 80, 10];
    /// let mut stream = LayerStream::with_budget(3, 2, Some((100, sizes)), |i| Ok::<_, ()>(i))?;
    /// while let Some(stage) = stream.next_stage() {
    ///     let index = stage.unwrap();
    ///     // ... run it, drop its weights, then:
    ///     stream.release(index);
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
                            // Only the stream itself holds another reference while it lives.
                            let closed = || Arc::strong_count(budget) == 1;
                            if !budget.acquire(index, &closed) {
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

    /// The next stage in order, `None` after the last one or after an error was returned.
    pub fn next_stage(&mut self) -> Option<Result<T, E>> {
        if self.next_index >= self.count {
            return None;
        }
        let index = self.next_index;
        self.next_index += 1;
        let stage = match &mut self.source {
            Source::Inline(load) => {
                if let Some(budget) = &self.budget {
                    budget.acquire(index, &|| false);
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
        if stage.is_err() {
            self.next_index = self.count;
        }
        Some(stage)
    }

    /// Says that stage `index` is gone, so its bytes no longer count against the budget.
    /// Without a budget it does nothing.
    pub fn release(&self, index: usize) {
        if let Some(budget) = &self.budget {
            budget.release(index);
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
            // A loader waiting on the budget sees the stream gone once this reference drops.
            drop(self.budget.take());
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
    use std::sync::Arc;
    use std::time::Duration;

    /// A stage that counts how many stages are alive at once.
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
    ) -> impl FnMut(usize) -> Result<Stage, String> + Send + 'static {
        move |index| {
            let now = alive.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            Ok(Stage {
                index,
                alive: alive.clone(),
            })
        }
    }

    fn run(depth: usize) -> (Vec<usize>, usize) {
        let alive = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let mut stream =
            LayerStream::new(8, depth, counting_loader(alive.clone(), most.clone())).unwrap();
        let mut order = Vec::new();
        while let Some(stage) = stream.next_stage() {
            let stage = stage.unwrap();
            // "Compute" long enough for the loader to run ahead as far as it may.
            std::thread::sleep(Duration::from_millis(5));
            order.push(stage.index);
        }
        drop(stream);
        assert_eq!(
            alive.load(Ordering::SeqCst),
            0,
            "a stage outlived the stream"
        );
        (order, most.load(Ordering::SeqCst))
    }

    #[test]
    fn stages_arrive_in_order_with_at_most_depth_plus_one_alive() {
        for depth in [0, 1, 2, 3] {
            let (order, most) = run(depth);
            assert_eq!(order, (0..8).collect::<Vec<_>>(), "depth {depth}");
            assert_eq!(most, depth + 1, "depth {depth}: stages alive at once");
        }
    }

    #[test]
    fn a_byte_budget_keeps_large_stages_apart() {
        // Sizes in "bytes"; the limit fits two small stages but never a large one beside
        // anything else.
        let sizes = vec![10, 10, 90, 10, 10, 90, 10];
        let alive = Arc::new(AtomicUsize::new(0));
        let most_bytes = Arc::new(AtomicUsize::new(0));
        let (a, m, sz) = (alive.clone(), most_bytes.clone(), sizes.clone());
        let mut stream = LayerStream::with_budget(7, 3, Some((100, sizes.clone())), move |i| {
            let now = a.fetch_add(sz[i] as usize, Ordering::SeqCst) + sz[i] as usize;
            m.fetch_max(now, Ordering::SeqCst);
            Ok::<_, ()>(i)
        })
        .unwrap();
        let mut order = Vec::new();
        while let Some(stage) = stream.next_stage() {
            let i = stage.unwrap();
            std::thread::sleep(Duration::from_millis(5));
            order.push(i);
            alive.fetch_sub(sizes[i] as usize, Ordering::SeqCst);
            stream.release(i);
        }
        assert_eq!(order, (0..7).collect::<Vec<_>>());
        assert_eq!(
            most_bytes.load(Ordering::SeqCst),
            100,
            "two small or one large at once"
        );
    }

    #[test]
    fn a_stream_waiting_on_its_budget_can_be_dropped() {
        let mut stream =
            LayerStream::with_budget(3, 2, Some((10, vec![10, 10, 10])), Ok::<_, ()>).unwrap();
        assert_eq!(stream.next_stage(), Some(Ok(0)));
        drop(stream); // the loader is waiting for stage 0's release, which never comes
    }

    #[test]
    fn an_error_ends_the_stream() {
        let mut stream = LayerStream::new(5, 1, |i| if i == 2 { Err(i) } else { Ok(i) }).unwrap();
        assert_eq!(stream.next_stage(), Some(Ok(0)));
        assert_eq!(stream.next_stage(), Some(Ok(1)));
        assert_eq!(stream.next_stage(), Some(Err(2)));
        assert_eq!(stream.next_stage(), None);
    }

    #[test]
    fn dropping_early_stops_the_loader() {
        let loaded = Arc::new(AtomicUsize::new(0));
        let counter = loaded.clone();
        let mut stream = LayerStream::new(1000, 2, move |i| {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok::<_, ()>(i)
        })
        .unwrap();
        assert_eq!(stream.next_stage(), Some(Ok(0)));
        drop(stream);
        assert!(loaded.load(Ordering::SeqCst) <= 4, "the loader kept going");
    }
}
