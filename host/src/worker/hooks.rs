//! What a running guest reaches through the worker: sub-tasks go to the same broker, with
//! their parent and root recorded.

use async_trait::async_trait;

use crate::client::{Client, EnqueueRequest};
use crate::runtime::{SubTaskRequest, TaskHooks, TaskInfo};
use crate::time::Timestamp;

pub(super) struct WorkerHooks {
    pub client: Client,
    /// The first task of the tree the running task belongs to.
    pub root_id: String,
}

#[async_trait]
impl TaskHooks for WorkerHooks {
    async fn enqueue(&self, parent: &TaskInfo, request: SubTaskRequest) -> Result<String, String> {
        let sub_task = EnqueueRequest {
            queue: request.queue,
            priority: request.priority,
            not_before: request
                .countdown
                .map(|countdown| Timestamp::now().saturating_add(countdown)),
            parent_id: Some(parent.id.clone()),
            root_id: Some(self.root_id.clone()),
            ..EnqueueRequest::new(request.name, request.args)
        };
        match self.client.enqueue(sub_task).await {
            Ok(envelope) => Ok(envelope.id),
            Err(error) => Err(error.to_string()),
        }
    }
}
