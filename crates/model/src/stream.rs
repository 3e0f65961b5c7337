//! `LayerStream`: load stage i+1 on a background thread while stage i runs.
//!
//! The stream hands out loaded stages in order. With a prefetch depth `d > 0`, a loader
//! thread works ahead of the consumer, but never more than `d` stages: at most `d + 1`
//! stages are alive at once (the one running, and up to `d` loaded or loading), which is
//! what the memory planner budgets. With depth 0 each stage loads on the caller's thread
//! when asked for, and only one is ever alive.

use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

/// Stages loaded in order, optionally ahead of use on a background thread.
pub struct LayerStream<T, E> {
    source: Source<T, E>,
    next_index: usize,
    count: usize,
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
        mut load: impl FnMut(usize) -> Result<T, E> + Send + 'static,
    ) -> std::io::Result<Self> {
        let source = if depth == 0 {
            Source::Inline(Box::new(load))
        } else {
            // The loader holds one finished stage while blocked in `send`, and the channel
            // holds `depth - 1`: `depth` stages ahead of the consumer in all.
            let (sender, receiver): (SyncSender<Result<T, E>>, _) = mpsc::sync_channel(depth - 1);
            let loader = std::thread::Builder::new()
                .name("memwise-prefetch".into())
                .spawn(move || {
                    for index in 0..count {
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
            Source::Inline(load) => load(index),
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
