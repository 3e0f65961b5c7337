//! A [`tracing_subscriber::Layer`] that opens a memory scope for each span: a program
//! instrumented with `#[instrument]` gets per-function peaks in its stats and reports
//! without calling memwise itself.
//!
//! ```
//! use tracing_subscriber::layer::SubscriberExt as _;
//!
//! let subscriber = tracing_subscriber::registry().with(memwise::tracing_layer::MemoryLayer::new());
//! tracing::subscriber::with_default(subscriber, || {
//!     memwise::enable_memory_tracking(true);
//!     let span = tracing::info_span!("load_weights");
//!     let _entered = span.enter();
//!     // ... work; its scope is named "load_weights"
//! });
//! ```
//!
//! A scope opens each time the span is entered and closes when it is exited, on that thread:
//! a span entered several times (an async task polled again) gives a record per entry, and
//! the per-name aggregates add them up. While tracking is off the layer records nothing.

use std::cell::RefCell;

use tracing::span::Id;
use tracing::Subscriber;
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

use crate::MemoryTracker;

thread_local! {
    /// The scopes this thread's entered spans opened, innermost last.
    static ENTERED: RefCell<Vec<(Id, MemoryTracker)>> = const { RefCell::new(Vec::new()) };
}

/// Opens a [`MemoryTracker`] scope, named after the span, for each span entry.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryLayer {
    _private: (),
}

impl MemoryLayer {
    /// The layer; add it to a registry with `SubscriberExt::with`.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<S> Layer<S> for MemoryLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_enter(&self, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let scope = MemoryTracker::new(span.name());
        if scope.is_recording() {
            ENTERED.with(|entered| entered.borrow_mut().push((id.clone(), scope)));
        }
    }

    fn on_exit(&self, id: &Id, _ctx: Context<'_, S>) {
        let scope = ENTERED.with(|entered| {
            let mut entered = entered.borrow_mut();
            let pos = entered.iter().rposition(|(open, _)| open == id)?;
            Some(entered.remove(pos))
        });
        // Dropped outside the borrow: closing a scope takes the registry lock.
        drop(scope);
    }
}
