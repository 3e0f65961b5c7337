//! A bad memwise setting in the environment is an error from `load_model_with_hooks` that
//! names the key and the variable, not a panic. Its own file: the environment and the
//! global configuration are process-wide.

use memwise_model::ModelConverter;

#[test]
fn a_bad_environment_setting_is_reported_not_panicked() {
    std::env::set_var("MEMWISE_MEMORY__PREFETCH_DEPTH", "lots");
    let folder = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/reference/tiny-llama"
    );
    let err = ModelConverter::new(folder)
        .load_model_with_hooks(true)
        .err()
        .expect("the bad setting is refused")
        .to_string();
    assert!(
        err.contains("memory.prefetch_depth") && err.contains("MEMWISE_MEMORY__PREFETCH_DEPTH"),
        "{err}"
    );
}
