//! Reports checked byte for byte against answers worked out by hand
//! (`tests/golden/small-reports.json` over `tests/golden/small.json`: boundary durations,
//! a phone without calls, a u64 phone, a duplicate, extra fields, another key order),
//! sharing nothing with the crate: field order, number formatting, nulls, the mean's
//! digits, and the envelope around `data`.

use crate::support;

use report_service::platform::clock::SystemClock;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use support::amqp::{Client, Names, next};
use support::start_service;

fn golden() -> (std::path::PathBuf, Vec<(serde_json::Value, String)>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let reports: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("small-reports.json")).expect("golden reports"))
            .expect("golden JSON");
    let tasks = reports["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .map(|t| (t["task"].clone(), t["data"].as_str().expect("data text").to_owned()))
        .collect();
    (dir.join("small.json"), tasks)
}

/// The exact text of `body`'s `data` array, and the body's keys in the order written.
fn data_text(body: &str) -> (&str, Vec<String>) {
    let start = body.find("\"data\":").expect("a data field") + "\"data\":".len();
    let end = body.rfind(",\"total_duration\":").expect("total_duration after data");
    let keys = body
        .match_indices("\":")
        .filter_map(|(at, _)| body[..at].rfind('"').map(|open| body[open + 1..at].to_owned()))
        .filter(|k| {
            ["correlation_id", "status", "task_received", "from", "to", "data", "total_duration"].contains(&k.as_str())
        })
        .collect();
    (&body[start..end], keys)
}

#[tokio::test]
async fn reports_through_the_broker_are_the_hand_worked_ones_byte_for_byte() {
    let names = Names::unique("golden");
    let dir = tempfile::tempdir().unwrap();
    let (data, tasks) = golden();
    let client = Client::new(&names).await;
    let mut reports = client.consume(&names.reports).await;
    let service = start_service(&names, &data, dir.path(), &[], Arc::new(SystemClock)).await;
    for (task, expected) in &tasks {
        client.send(&task.to_string()).await;
        let delivery = next(&mut reports).await;
        let body = String::from_utf8(delivery.data.clone()).expect("UTF-8");
        let (data, keys) = data_text(&body);
        assert_eq!(data, expected, "task {task}");
        assert_eq!(keys, ["correlation_id", "status", "task_received", "from", "to", "data", "total_duration"]);
        let id = &task["correlation_id"];
        assert!(
            body.starts_with(&format!("{{\"correlation_id\":{id},\"status\":\"Complete\",\"task_received\":\"")),
            "{body}"
        );
        assert!(body.contains("\",\"from\":\"report_service\",\"to\":\"client\",\"data\":["), "{body}");
        // `%Y-%m-%d %H:%M:%S.%f`: 26 characters, microseconds.
        let received = body.split("\"task_received\":\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("");
        let shape: String = received.chars().map(|c| if c.is_ascii_digit() { 'd' } else { c }).collect();
        assert_eq!(shape, "dddd-dd-dd dd:dd:dd.dddddd", "{received}");
        let property = delivery.properties.correlation_id().as_ref().map(|c| c.as_str().to_owned());
        assert_eq!(property.as_deref(), Some(id.as_str().map_or(id.to_string(), str::to_owned).as_str()));
        assert_eq!(delivery.properties.content_type().as_ref().map(|c| c.as_str()), Some("application/json"));
        assert_eq!(*delivery.properties.delivery_mode(), Some(2), "persistent");
    }
    service.stop().await.unwrap();
}

/// `report-service report` prints the same bytes (it is the same path without a broker).
#[test]
fn the_report_command_prints_the_hand_worked_data() {
    let (data, tasks) = golden();
    let (task, expected) = &tasks[0];
    let phones: Vec<String> = task["phones"].as_array().unwrap().iter().map(|p| p.to_string()).collect();
    let out = Command::new(env!("CARGO_BIN_EXE_report-service"))
        .args(["report", "--data"])
        .arg(&data)
        .args(["--phones", &phones.join(","), "--correlation-id", &task["correlation_id"].to_string()])
        .output()
        .expect("report-service report");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let body = String::from_utf8(out.stdout).expect("UTF-8");
    assert_eq!(data_text(body.trim_end()).0, expected);
}
