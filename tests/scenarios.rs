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
    bundle_json_random => "bundle/json_random.lua",
    bundle_bson_stage => "bundle/bson_stage.lua",
    process_fields => "process/fields.lua",
}
