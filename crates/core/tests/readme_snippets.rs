//! The README's model pipeline is the `model_pipeline` example's code, line for line, so the
//! snippet a newcomer copies is one CI runs (the other snippets run as doctests).

#[test]
fn the_readme_model_pipeline_is_the_example_that_runs() {
    let readme = include_str!("../../../README.md");
    let example = include_str!("../../model/examples/model_pipeline.rs");
    let snippet = readme
        .split("```rust ignore\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the README shows the model pipeline");
    let example_lines: Vec<&str> = example.lines().map(str::trim).collect();
    for line in snippet.lines().map(str::trim).filter(|l| !l.is_empty()) {
        assert!(
            example_lines.contains(&line),
            "README line not in crates/model/examples/model_pipeline.rs: {line}"
        );
    }
}
