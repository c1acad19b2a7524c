//! Rows a user function raised on, listed on DynamoDB: one item each,
//! keyed by fragment and row, so recording one twice is harmless.

use aws_sdk_dynamodb::types::AttributeValue;
use futures::{StreamExt, TryStreamExt};

use super::DynamoJobStore;
use super::calls::{Failure, classify, retry_busy};
use super::items::{Item, get_s, job_pk, key, s};
use crate::ports::store::{RowFailure, StoreResult};

const PREFIX: &str = "ROWFAIL#";
/// Puts in flight at once.
const PARALLELISM: usize = 8;

fn sk(failure: &RowFailure) -> String {
    format!("{PREFIX}{:020}#{:020}", failure.fragment_id, failure.row)
}

fn from_item(item: &Item) -> Option<RowFailure> {
    let sk = get_s(item, "sk")?.strip_prefix(PREFIX)?;
    let (fragment, row) = sk.split_once('#')?;
    Some(RowFailure {
        fragment_id: fragment.parse().ok()?,
        row: row.parse().ok()?,
        error: get_s(item, "error").unwrap_or_default().to_string(),
    })
}

impl DynamoJobStore {
    pub(super) async fn put_row_failures(
        &self,
        job_id: &str,
        failures: &[RowFailure],
    ) -> StoreResult<()> {
        let items: Vec<Item> = failures
            .iter()
            .map(|failure| {
                let mut item = key(job_pk(job_id), sk(failure));
                item.insert("error".into(), s(&failure.error));
                item
            })
            .collect();
        futures::stream::iter(items)
            .map(|item| self.put_row_failure(item))
            .buffer_unordered(PARALLELISM)
            .try_collect::<Vec<_>>()
            .await?;
        Ok(())
    }

    async fn put_row_failure(&self, item: Item) -> StoreResult<()> {
        retry_busy(|| async {
            self.client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(item.clone()))
                .send()
                .await
                .map_err(|err| classify(err, "PutItem row failure"))
        })
        .await
        .map_err(Failure::into_store_error)?;
        Ok(())
    }

    pub(super) async fn row_failures(
        &self,
        job_id: &str,
        limit: usize,
    ) -> StoreResult<Vec<RowFailure>> {
        let output = retry_busy(|| async {
            self.client
                .query()
                .table_name(&self.table)
                .key_condition_expression("pk = :pk AND begins_with(sk, :prefix)")
                .expression_attribute_values(":pk", s(job_pk(job_id)))
                .expression_attribute_values(":prefix", AttributeValue::S(PREFIX.into()))
                .limit(limit.max(1) as i32)
                .consistent_read(true)
                .send()
                .await
                .map_err(|err| classify(err, "Query row failures"))
        })
        .await
        .map_err(Failure::into_store_error)?;
        Ok(output.items().iter().filter_map(from_item).collect())
    }
}
