//! iceoryx2 nodes: one per process, configured with the run's private root directory.

use std::sync::Mutex;

use iceoryx2::config::Config;
use iceoryx2::node::{NodeState, NodeView};
use iceoryx2::prelude::*;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::errors::{port_err, service_err, transport_err};

/// Every storage file based, under the root path (see `service.rs`).
pub type Svc = crate::service::PrivateService;

/// Builds the iceoryx2 configuration of one run: every file it creates lives under `root` (the
/// run's private directory) and starts with `prefix`.
///
/// `root` must be an existing directory, not a symlink: iceoryx2 would otherwise create it
/// itself, group-readable, and a path through a planted symlink would be followed.
pub fn make_config(prefix: &str, root: &str) -> PyResult<Config> {
    match std::fs::symlink_metadata(root) {
        Ok(m) if m.file_type().is_dir() => {}
        Ok(_) => {
            return Err(PyValueError::new_err(format!(
                "iceoryx2 root {root:?} is not a directory (a symlink or a file); it must be the run's private directory"
            )));
        }
        Err(e) => {
            return Err(PyValueError::new_err(format!(
                "iceoryx2 root {root:?} does not exist ({e}); create the run's private directory (0700) first"
            )));
        }
    }
    let mut cfg = Config::default();
    cfg.global.prefix = FileName::new(prefix.as_bytes()).map_err(|e| {
        service_err(
            format!("invalid iceoryx2 file prefix {prefix:?} (use [A-Za-z0-9_.-], at most 255 bytes)"),
            e,
        )
    })?;
    let path = Path::new(root.as_bytes()).map_err(|e| service_err(format!("invalid iceoryx2 root path {root:?}"), e))?;
    cfg.global.set_root_path(&path);
    Ok(cfg)
}

/// An iceoryx2 node of this process. Ports created from it keep it alive until they are
/// closed; `close()` releases the node itself (its files under the root), so a finished run
/// holds nothing whatever Python objects still reference it.
///
/// Signal handling of iceoryx2 is disabled: signals belong to the Python process.
#[pyclass(module = "remotemedia._ipc_bridge", frozen)]
pub struct Node {
    inner: Mutex<Option<iceoryx2::node::Node<Svc>>>,
    #[pyo3(get)]
    prefix: String,
    #[pyo3(get)]
    name: String,
    #[pyo3(get)]
    root: String,
}

impl Node {
    /// Runs `f` with the iceoryx2 node; TransportError once it is closed.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&iceoryx2::node::Node<Svc>) -> PyResult<R>) -> PyResult<R> {
        let guard = self.inner.lock().expect("node mutex poisoned");
        match guard.as_ref() {
            Some(n) => f(n),
            None => Err(transport_err(format!("iceoryx2 node {:?} of {:?} is closed", self.name, self.root))),
        }
    }
}

#[pymethods]
impl Node {
    #[new]
    #[pyo3(signature = (prefix, name, root))]
    fn new(prefix: &str, name: &str, root: &str) -> PyResult<Self> {
        let config = make_config(prefix, root)?;
        let mut builder = NodeBuilder::new()
            .config(&config)
            .signal_handling_mode(SignalHandlingMode::Disabled);
        if !name.is_empty() {
            let node_name = NodeName::new(name)
                .map_err(|e| port_err(format!("invalid node name {name:?}"), e))?;
            builder = builder.name(&node_name);
        }
        let inner = builder
            .create::<Svc>()
            .map_err(|e| port_err(format!("creating iceoryx2 node {name:?} with prefix {prefix:?}"), e))?;
        Ok(Self { inner: Mutex::new(Some(inner)), prefix: prefix.to_owned(), name: name.to_owned(), root: root.to_owned() })
    }

    /// Removes the stale resources of every dead node of this prefix (crashed processes).
    /// Returns `(cleaned, failed)`.
    fn cleanup_dead_nodes(&self, py: Python<'_>) -> PyResult<(u64, u64)> {
        // The lock is taken without the GIL: holding it while taking the GIL back could
        // deadlock with a thread that holds the GIL and waits for the lock.
        py.detach(|| {
            let guard = self.inner.lock().expect("node mutex poisoned");
            guard.as_ref().map(|n| n.try_cleanup_dead_nodes())
        })
        .map(|state| (state.cleanups, state.failed_cleanups))
        .ok_or_else(|| transport_err(format!("iceoryx2 node {:?} of {:?} is closed", self.name, self.root)))
    }

    /// Releases the node (its files under the root go once no port of it is left open);
    /// creating a port on it afterwards raises TransportError. Idempotent.
    fn close(&self) {
        let node = self.inner.lock().expect("node mutex poisoned").take();
        drop(node);
    }

    /// True once `close()` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.inner.lock().expect("node mutex poisoned").is_none()
    }

    fn __repr__(&self) -> String {
        format!("<ipc_bridge.Node name={:?} prefix={:?} root={:?}>", self.name, self.prefix, self.root)
    }
}

/// What a port holds only to keep its service and its node alive while it is open: its
/// service's factory and the Node object. The port's `close()` drops it together with the
/// iceoryx2 port, so a closed port keeps nothing of a run, however long Python keeps the
/// closed object (a traceback, a reference cycle awaiting the garbage collector).
pub(crate) struct Anchor<F>(Mutex<Option<(F, Py<Node>)>>);

impl<F> Anchor<F> {
    pub(crate) fn new(factory: F, node: Py<Node>) -> Self {
        Self(Mutex::new(Some((factory, node))))
    }

    /// Drops the factory and the reference to the node (the caller holds the GIL).
    pub(crate) fn release(&self) {
        let kept = self.0.lock().expect("anchor mutex poisoned").take();
        drop(kept);
    }
}

/// Lists the iceoryx2 nodes of `prefix` as `(state, pid, name)` tuples, `state` being one of
/// `"alive"`, `"dead"`, `"inaccessible"`, `"undefined"`.
#[pyfunction]
#[pyo3(signature = (prefix, root))]
pub fn list_nodes(prefix: &str, root: &str) -> PyResult<Vec<(String, Option<u32>, String)>> {
    let config = make_config(prefix, root)?;
    let mut out = Vec::new();
    iceoryx2::node::Node::<Svc>::list(&config, |state| {
        let details = |d: &Option<iceoryx2::node::NodeDetails>| match d {
            Some(d) => (Some(d.process_id().value() as u32), d.name().as_str().to_owned()),
            None => (None, String::new()),
        };
        match state {
            NodeState::Alive(v) => {
                let (pid, name) = details(v.details());
                out.push(("alive".into(), pid, name));
            }
            NodeState::Dead(v) => {
                let (pid, name) = details(v.details());
                out.push(("dead".into(), pid, name));
            }
            NodeState::Inaccessible(_) => out.push(("inaccessible".into(), None, String::new())),
            NodeState::Undefined(_) => out.push(("undefined".into(), None, String::new())),
        }
        CallbackProgression::Continue
    })
    .map_err(|e| service_err(format!("listing iceoryx2 nodes of prefix {prefix:?}"), e))?;
    Ok(out)
}

/// Removes the stale resources of every dead node of `prefix`, without creating a node.
/// Returns `(cleaned, failed)`.
#[pyfunction]
#[pyo3(signature = (prefix, root))]
pub fn remove_stale_resources(py: Python<'_>, prefix: &str, root: &str) -> PyResult<(u64, u64)> {
    let config = make_config(prefix, root)?;
    py.detach(|| {
        let mut dead = Vec::new();
        iceoryx2::node::Node::<Svc>::list(&config, |state| {
            if let NodeState::Dead(v) = state {
                dead.push(v);
            }
            CallbackProgression::Continue
        })
        .map_err(|e| format!("listing iceoryx2 nodes of prefix {prefix:?}: {e:?}"))?;
        let (mut ok, mut failed) = (0u64, 0u64);
        for v in dead {
            match v.try_remove_stale_resources() {
                Ok(()) => ok += 1,
                Err(_) => failed += 1,
            }
        }
        Ok::<_, String>((ok, failed))
    })
    .map_err(|msg| service_err(msg, "cleanup"))
}
