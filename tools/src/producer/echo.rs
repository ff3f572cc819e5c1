//! The broker baseline: a bare consumer answering every task like the service does
//! (publisher confirm, then ack), without computing anything.

use super::client::{Client, ClientError, amqp, persistent_json};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use tokio_util::sync::CancellationToken;

/// A bare consumer that answers every task with a report of `reply_bytes` (at least a
/// minimal one), publisher-confirmed and acked after the confirm, like the service: the
/// broker's own limit for a load with replies of that size.
pub async fn echo(
    client: &Client,
    prefetch: u16,
    reply_bytes: usize,
    stop: CancellationToken,
) -> Result<u64, ClientError> {
    let padding = "x".repeat(reply_bytes.saturating_sub(64));
    let consume_channel = client.connection.create_channel().await.map_err(amqp("channel.open"))?;
    consume_channel.basic_qos(prefetch, BasicQosOptions::default()).await.map_err(amqp("basic.qos"))?;
    let mut tasks = consume_channel
        .basic_consume(client.task_queue.clone(), "echo".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .map_err(amqp("basic.consume"))?;
    let mut answered = 0u64;
    let mut in_flight = futures_util::stream::FuturesUnordered::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            Some(()) = in_flight.next(), if !in_flight.is_empty() => answered += 1,
            next = tasks.next() => {
                let Some(Ok(delivery)) = next else { break };
                let (channel, padding) = (client.channel.clone(), padding.clone());
                in_flight.push(async move {
                    let id = sonic_rs::get_from_slice(&delivery.data, &["correlation_id"]).map(|v| v.as_raw_str().to_owned()).unwrap_or_default();
                    let body = format!(r#"{{"correlation_id":{id},"status":"Complete","data":[],"pad":"{padding}"}}"#);
                    let reply_to = delivery.properties.reply_to().clone().unwrap_or_else(|| "ready_report".into());
                    let properties = persistent_json()
                        .with_correlation_id(ShortString::try_new(id.as_str()).unwrap_or_default());
                    if let Ok(confirm) = channel.basic_publish("".into(), reply_to, BasicPublishOptions::default(), body.as_bytes(), properties).await
                        && confirm.await.is_ok()
                    {
                        // A failed ack redelivers the task, which is answered again:
                        // harmless for a baseline that only counts answers.
                        let _ = delivery.ack(BasicAckOptions::default()).await;
                    }
                });
            }
        }
    }
    Ok(answered)
}
