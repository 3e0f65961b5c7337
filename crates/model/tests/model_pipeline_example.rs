//! The `model_pipeline` example runs and prints a scope for loading, for every stage and
//! for inference; `memory.clean_weights_after_use = false` keeps the weights resident until
//! the model is dropped. One test: the heap counters are process-wide.

#[allow(dead_code)]
#[path = "../examples/model_pipeline.rs"]
mod example;

use memwise::config::with_config;
use memwise::get_config;

/// The example's lines, with `memory.clean_weights_after_use` set to `clean` on this thread.
fn run_with(clean: bool) -> Vec<String> {
    let mut config = (*get_config()).clone();
    config.memory.clean_weights_after_use = clean;
    with_config(config, || example::run().unwrap())
}

/// The heap bytes the final `clear_memory(model)` gave back.
fn final_freed(lines: &[String]) -> i64 {
    let last = lines.last().unwrap();
    let figure = last
        .strip_prefix("final cleanup freed ")
        .and_then(|rest| rest.split_whitespace().next());
    figure.unwrap().parse().unwrap()
}

#[test]
fn the_model_pipeline_example_prints_its_scopes_and_honours_clean_weights() {
    let lines = run_with(true);
    let text = lines.join("\n");
    assert!(text.contains("clean_weights_after_use = true"), "{text}");
    for scope in [
        "model_loading ",
        "model.embed_tokens ",
        "model.layers.1 ",
        "lm_head ",
        "inference ",
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(scope) && l.contains("peak +")),
            "no scope {scope:?} in:\n{text}"
        );
    }

    // Released after use, the weights are gone before the model is; kept resident, they
    // are freed only with it (the tiny Llama's weights are about 360 KB).
    let streamed = final_freed(&lines);
    let resident = run_with(false);
    assert!(
        resident[0].contains("clean_weights_after_use = false"),
        "{resident:?}"
    );
    assert!(
        final_freed(&resident) > streamed + 200_000,
        "{streamed} vs {resident:?}"
    );

    // A device this build cannot run on is refused in one line naming the key.
    let mut on_gpu = (*get_config()).clone();
    on_gpu.device = "cuda:0".parse().unwrap();
    let err = with_config(on_gpu, example::run).unwrap_err().to_string();
    assert!(
        err.starts_with("device (from code (configure)): cuda:0 is not available"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}
