//! The background sampler reads while tracking is on, and only then, on the scopes' clock.

use std::time::Duration;

use memwise::report::Sampler;
use memwise::{enable_memory_tracking, get_memory_stats, track};

#[test]
fn the_sampler_reads_while_tracking_is_on_and_only_then() {
    enable_memory_tracking(false);
    let sampler = Sampler::start(Duration::from_millis(1), 16);
    std::thread::sleep(Duration::from_millis(20));
    assert!(
        sampler.samples().is_empty(),
        "nothing read while tracking is off"
    );

    enable_memory_tracking(true);
    track("sampled", || std::thread::sleep(Duration::from_millis(60)));
    let samples = sampler.stop();
    assert!(
        samples.len() >= 3 && samples.len() <= 16,
        "{} samples",
        samples.len()
    );
    assert!(samples.windows(2).all(|w| w[0].at <= w[1].at));
    #[cfg(target_os = "linux")]
    assert!(samples.iter().all(|s| s.process.is_some_and(|p| p.rss > 0)));
    // Without the tracking allocator the heap is unavailable, not zero.
    assert!(samples.iter().all(|s| s.heap.is_none()));

    let scope = get_memory_stats()
        .scopes_named("sampled")
        .next()
        .cloned()
        .unwrap();
    let inside = samples
        .iter()
        .filter(|s| s.at >= scope.start && s.at <= scope.start + scope.duration)
        .count();
    assert!(inside >= 2, "samples share the scopes' clock");
}
