//! One test per Lua scenario under tests/lua/ (see tests/harness/mod.rs for the rules).

#[macro_use]
mod harness;

scenarios! {
    stage_search_path => "stage/search_path.lua",
    stage_file_id => "stage/file_id.lua",
    stage_hot_reload => "stage/hot_reload.lua",
    stage_failover_syntax => "stage/failover_syntax.lua",
    stage_failover_runtime => "stage/failover_runtime.lua",
    stage_require_no_reload => "stage/require_no_reload.lua",
    stage_addtask => "stage/addtask.lua",
    stage_submit => "stage/submit.lua",
    stage_once_call_sleep => "stage/once_call_sleep.lua",
    stage_idle => "stage/idle.lua",
    stage_callback_errors => "stage/callback_errors.lua",
    stage_instances => "stage/instances.lua",
    stage_durations => "stage/durations.lua",
    bundle_json_random => "bundle/json_random.lua",
    bundle_bson_stage => "bundle/bson_stage.lua",
    bundle_json_text_not_path => "bundle/json_text_not_path.lua",
    process_fields => "process/fields.lua",
}

/// A panic in a binding: one error line per failed callback, with the panic's message and
/// the script's traceback; never Lua's "C stack overflow" from a recursing error handler.
#[test]
fn stage_panic() {
    let out = harness::run_scenario_output("stage/panic.lua", |_| {});
    assert!(!out.contains("stack overflow"), "{out}");
    assert!(!out.contains("error in error handling"), "{out}");
    for what in ["task", "submit"] {
        let line = format!("error in {what}: hook panic in {what}");
        let at: Vec<_> = out.match_indices(&line).map(|(i, _)| i).collect();
        assert_eq!(at.len(), 1, "one error line for the {what}:\n{out}");
        // The entry: its line, "stack traceback:", then the tab-indented frames.
        let mut lines = out[at[0]..].lines();
        lines.next();
        assert_eq!(lines.next(), Some("stack traceback:"), "{out}");
        let frames: Vec<_> = lines.take_while(|l| l.starts_with('\t')).collect();
        assert!(
            frames.iter().any(|f| f.contains("package/start.lua:")),
            "the script's frames: {frames:?}"
        );
        assert!(frames.len() < 10, "a short traceback: {frames:?}");
        assert!(
            !frames.iter().any(|f| f.contains("xpcall")),
            "no runner frames: {frames:?}"
        );
    }
    assert!(out.contains("'deep_in_the_script'"), "{out}");
}
