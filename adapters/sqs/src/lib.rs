//! Marathon's `Queue` on AWS SQS: long polling, batching, visibility extension, dead-letter redrive. (Work in progress.)
