//! Typed registration of workflows and activities by name.

use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use crate::engine::activity::ActivityContext;
use crate::engine::context::WorkflowContext;
use crate::model::{ActivityError, WorkflowError};

/// A registered function on JSON values, taking a context `C` and failing with `E`.
pub type JsonFn<C, E> = Arc<dyn Fn(C, Value) -> BoxFuture<'static, Result<Value, E>> + Send + Sync>;

/// A registered workflow function on JSON values.
pub type WorkflowFn = JsonFn<WorkflowContext, WorkflowError>;

/// A registered activity function on JSON values.
pub type ActivityFn = JsonFn<ActivityContext, ActivityError>;

/// Checks that a JSON value reads as a typed workflow's input; the error is serde's.
type InputCheck = Arc<dyn Fn(&Value) -> Result<(), serde_json::Error> + Send + Sync>;

/// `f`, typed on its input and output, as a function on JSON values (the shape of
/// [`WorkflowFn`] and [`ActivityFn`]): input that does not deserialize into `I`, or
/// output that does not serialize, is a `serialization` error `E`.
fn on_json<C, I, O, E, F, Fut>(f: F) -> JsonFn<C, E>
where
    C: Send + 'static,
    I: DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
    E: From<serde_json::Error> + Send + 'static,
    F: Fn(C, I) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, E>> + Send + 'static,
{
    let f = Arc::new(f);
    Arc::new(move |ctx, input: Value| {
        let f = f.clone();
        async move {
            let input: I = serde_json::from_value(input)?;
            let out = f(ctx, input).await?;
            Ok(serde_json::to_value(out)?)
        }
        .boxed()
    })
}

/// The workflows and activities a replica can run, by name.
#[derive(Clone, Default)]
pub struct Registry {
    workflows: BTreeMap<String, WorkflowFn>,
    /// Input checks of the workflows registered with a type.
    input_checks: BTreeMap<String, InputCheck>,
    activities: BTreeMap<String, ActivityFn>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("workflows", &self.workflows.keys().collect::<Vec<_>>())
            .field("activities", &self.activities.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Registry {
    /// An empty registry.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers workflow `name`: `async fn(WorkflowContext, I) -> Result<O, WorkflowError>`.
    ///
    /// A start whose input does not deserialize into `I` is refused
    /// ([`crate::EngineError::InvalidArgument`], a 400 over HTTP); a run recorded
    /// before with such an input fails with a `serialization` error.
    pub fn workflow<I, O, F, Fut>(&mut self, name: impl Into<String>, f: F) -> &mut Self
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(WorkflowContext, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, WorkflowError>> + Send + 'static,
    {
        let name = name.into();
        let check: InputCheck = Arc::new(|input: &Value| I::deserialize(input).map(|_| ()));
        self.input_checks.insert(name.clone(), check);
        self.workflows.insert(name, on_json(f));
        self
    }

    /// Registers a workflow already working on JSON values (its input is not checked
    /// at start).
    pub fn workflow_fn(&mut self, name: impl Into<String>, f: WorkflowFn) -> &mut Self {
        let name = name.into();
        self.input_checks.remove(&name);
        self.workflows.insert(name, f);
        self
    }

    /// Checks `input` against the input type of workflow `name`, when it was
    /// registered with one ([`Self::workflow`]).
    ///
    /// # Errors
    /// Serde's message when `input` does not deserialize into that type.
    pub fn check_input(&self, name: &str, input: &Value) -> Result<(), String> {
        match self.input_checks.get(name) {
            Some(check) => check(input).map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }

    /// Registers activity `name`: `async fn(ActivityContext, I) -> Result<O, ActivityError>`.
    ///
    /// Input that does not deserialize into `I` is a permanent `serialization` failure.
    pub fn activity<I, O, F, Fut>(&mut self, name: impl Into<String>, f: F) -> &mut Self
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(ActivityContext, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, ActivityError>> + Send + 'static,
    {
        self.activities.insert(name.into(), on_json(f));
        self
    }

    /// Registers an activity already working on JSON values.
    pub fn activity_fn(&mut self, name: impl Into<String>, f: ActivityFn) -> &mut Self {
        self.activities.insert(name.into(), f);
        self
    }

    /// The workflow registered as `name`.
    #[must_use]
    pub fn find_workflow(&self, name: &str) -> Option<&WorkflowFn> {
        self.workflows.get(name)
    }

    /// The activity registered as `name`.
    #[must_use]
    pub fn find_activity(&self, name: &str) -> Option<&ActivityFn> {
        self.activities.get(name)
    }

    /// Names of the registered workflows, sorted.
    pub fn workflow_names(&self) -> impl Iterator<Item = &str> {
        self.workflows.keys().map(String::as_str)
    }

    /// Names of the registered activities, sorted.
    pub fn activity_names(&self) -> impl Iterator<Item = &str> {
        self.activities.keys().map(String::as_str)
    }
}

impl Registry {
    /// Registers a declarative [`crate::Pipeline`] as workflow `name`.
    ///
    /// # Errors
    /// When the pipeline is invalid.
    pub fn pipeline(
        &mut self,
        name: impl Into<String>,
        pipeline: crate::Pipeline,
    ) -> Result<&mut Self, crate::PipelineError> {
        let f = pipeline.into_workflow()?;
        Ok(self.workflow_fn(name, f))
    }
}
