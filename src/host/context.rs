//! `InstanceCtx`: the state of one instance that bindings reach from a Lua state
//! (`ctx(lua)`), and `NodeShared` behind it.

use crate::host::loader::Loader;
use crate::host::node::NodeShared;
use mlua::{Function, Lua, MultiValue};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use tokio::task::AbortHandle;

/// The state of one instance that Lua modules reach through `lua.app_data_ref`.
pub struct InstanceCtx {
    pub node: Arc<NodeShared>,
    pub stage_id: String,
    /// The instance number: its index among the Lua instances of `#startup`, or for an
    /// instance started at run time a number after every other (never reused).
    pub number: usize,
    /// `stage_id#number`, used as the log target of `print` and `logger`.
    pub name: String,
    pub loader: Loader,
    pub(crate) tasks: RefCell<HashMap<i64, (AbortHandle, Rc<crate::host::tasks::TaskCtl>)>>,
    pub(crate) next_task: Cell<i64>,
    /// Work queued per `stage.submit` key; a key present here has a drain task running.
    pub(crate) submits: RefCell<HashMap<String, VecDeque<(Function, MultiValue)>>>,
}

impl InstanceCtx {
    pub fn new(node: &Arc<NodeShared>, stage_id: &str, number: usize) -> InstanceCtx {
        InstanceCtx {
            node: node.clone(),
            stage_id: stage_id.to_string(),
            number,
            name: format!("{stage_id}#{number}"),
            loader: Loader::new(node.home.clone(), node.generation.clone())
                .count_reloads(node.metrics.clone(), &format!("{stage_id}#{number}")),
            tasks: RefCell::new(HashMap::new()),
            next_task: Cell::new(0),
            submits: RefCell::new(HashMap::new()),
        }
    }
}

/// The instance context of a Lua state.
pub fn ctx(lua: &Lua) -> Rc<InstanceCtx> {
    lua.app_data_ref::<Rc<InstanceCtx>>()
        .expect("every Lua state of stage has an instance context")
        .clone()
}
