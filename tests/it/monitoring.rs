//! Names that cannot drift: every `report_service_` metric the alert rules
//! (`monitoring/alerts.yml`) and the Grafana dashboard (`monitoring/grafana-dashboard.json`)
//! use is exported by a running worker, after real traffic, with every label they select
//! or group by; and the README's metric list names exactly what is exported.

use crate::support;

use report_service::platform::clock::SystemClock;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use support::amqp::{Client, Names, data_file, next, next_json};
use support::worker::http_get;
use support::{start_service, task};

/// Labels Prometheus adds to every series it scrapes, and the histogram's bucket label.
const TARGET_LABELS: [&str; 3] = ["instance", "job", "le"];

/// The exposition's series: each sample's name and the label names seen on it.
fn exported(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut series: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let (name, labels) = match line.split_once('{') {
            Some((name, rest)) => (name, rest.split_once('}').map_or("", |(labels, _)| labels)),
            None => (line.split_whitespace().next().unwrap_or(""), ""),
        };
        let entry = series.entry(name.to_owned()).or_default();
        for pair in labels.split(',').filter(|p| !p.is_empty()) {
            if let Some((label, _)) = pair.split_once('=') {
                entry.insert(label.trim().to_owned());
            }
        }
    }
    series
}

/// The PromQL expressions of the alert rules and of the dashboard's panels.
fn expressions() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("monitoring");
    let mut found = Vec::new();
    let rules = std::fs::read_to_string(root.join("alerts.yml")).expect("alerts.yml");
    let mut lines = rules.lines().peekable();
    while let Some(line) = lines.next() {
        if let Some(expr) = line.trim().strip_prefix("expr:") {
            let mut expr = expr.trim().trim_start_matches('|').trim().to_owned();
            // A block scalar: the more indented lines that follow.
            while let Some(next) = lines.peek() {
                if next.trim().is_empty() || next.trim_start().contains(':') && !next.contains('(') {
                    break;
                }
                expr.push(' ');
                expr.push_str(next.trim());
                lines.next();
            }
            found.push(("alerts.yml".to_owned(), expr));
        }
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("grafana-dashboard.json")).expect("dashboard"))
            .expect("dashboard JSON");
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let title = panel["title"].as_str().unwrap_or("").to_owned();
            found.push((format!("dashboard: {title}"), target["expr"].as_str().expect("expr").to_owned()));
        }
    }
    found
}

/// Every `report_service_` metric an expression selects, with the labels it matches on.
fn selected(expr: &str) -> Vec<(String, BTreeSet<String>)> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("report_service_") {
        let tail = &rest[at..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        let name = &tail[..end];
        let mut labels = BTreeSet::new();
        if tail[end..].starts_with('{') {
            let close = tail[end..].find('}').map_or(tail.len(), |c| end + c);
            for matcher in tail[end + 1..close].split(',') {
                let label: String =
                    matcher.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                if !label.is_empty() {
                    labels.insert(label);
                }
            }
        }
        out.push((name.to_owned(), labels));
        rest = &tail[end..];
    }
    out
}

/// The labels an expression groups by (`by (a, b)`).
fn grouped_by(expr: &str) -> BTreeSet<String> {
    let mut labels = BTreeSet::new();
    for part in expr.split("by (").skip(1).chain(expr.split("by(").skip(1)) {
        let inside = part.split(')').next().unwrap_or("");
        labels.extend(inside.split(',').map(|l| l.trim().to_owned()).filter(|l| !l.is_empty()));
    }
    labels
}

/// A worker's `/metrics` after real traffic: computed and cached phones, one without
/// records, an error report and a dead letter, so every labelled family has samples.
async fn scrape_after_traffic(label: &str) -> String {
    let names = Names::unique(label);
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = data_file(dir.path(), 10, 100);
    let client = Client::new(&names).await;
    let mut reports = client.consume(&names.reports).await;
    let mut dead = client.consume(&names.dlq).await;
    let service = start_service(&names, &data, dir.path(), &[], Arc::new(SystemClock)).await;
    for (id, phones) in [(1, vec![1, 2, 999]), (2, vec![1, 2])] {
        client.send(&task(id, &phones)).await;
        next_json(&mut reports).await;
    }
    client.send(r#"{"correlation_id": 3, "phones": "nope"}"#).await;
    next_json(&mut reports).await;
    client.send("not json").await;
    next(&mut dead).await;
    // The dead letter is counted once its publish is confirmed, which can be a moment
    // after the copy reaches the DLQ's consumer: scrape until it is (bounded).
    let http = service.http_addr();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let text = loop {
        let (status, text) = tokio::task::spawn_blocking(move || http_get(http, "/metrics")).await.unwrap();
        assert_eq!(status, 200);
        if text.contains("report_service_dead_lettered_total{") {
            break text;
        }
        assert!(std::time::Instant::now() < deadline, "the dead letter was never counted:\n{text}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    service.stop().await.unwrap();
    text
}

#[tokio::test]
async fn every_metric_the_rules_and_the_dashboard_use_is_exported_with_its_labels() {
    let text = scrape_after_traffic("monitoring").await;
    let series = exported(&text);

    let mut missing = Vec::new();
    for (source, expr) in expressions() {
        let used = selected(&expr);
        let known: BTreeSet<String> = used.iter().filter_map(|(n, _)| series.get(n)).flatten().cloned().collect();
        for (name, labels) in &used {
            match series.get(name) {
                None => missing.push(format!("{source}: {name} is not exported")),
                Some(exported_labels) => {
                    for label in labels.iter().filter(|l| !TARGET_LABELS.contains(&l.as_str())) {
                        if !exported_labels.contains(label) {
                            missing.push(format!("{source}: {name} has no label {label}"));
                        }
                    }
                }
            }
        }
        if !used.is_empty() {
            for label in grouped_by(&expr).iter().filter(|l| !TARGET_LABELS.contains(&l.as_str())) {
                if !known.contains(label) {
                    missing.push(format!("{source}: grouped by {label}, which no metric of `{expr}` has"));
                }
            }
        }
    }
    assert!(missing.is_empty(), "the rules and the dashboard use what is not exported:\n{}", missing.join("\n"));
}

/// The README's list of metrics ("Health and metrics") names exactly the metrics a worker
/// exports: none missing, none that does not exist.
#[tokio::test]
async fn the_readme_lists_exactly_the_exported_metrics() {
    let text = scrape_after_traffic("readmemetrics").await;
    // Declared families (`# TYPE name kind`), as the README names them: counters with
    // `_total`, histograms by their base name.
    let exported: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let (name, kind) = (words.next()?, words.next()?);
            Some(if kind == "counter" { format!("{name}_total") } else { name.to_owned() })
        })
        .collect();
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).expect("README");
    let section = readme
        .split("**Health and metrics.**")
        .nth(1)
        .and_then(|s| s.split("\n\n**").next())
        .expect("the README's metric list");
    let listed: BTreeSet<String> = section
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("report_service_"))
        .map(str::to_owned)
        .collect();
    let unlisted: Vec<_> = exported.difference(&listed).collect();
    let unknown: Vec<_> = listed.difference(&exported).collect();
    assert!(
        unlisted.is_empty() && unknown.is_empty(),
        "exported but not listed: {unlisted:?}; listed but not exported: {unknown:?}"
    );
}

/// The checks can fail: an unknown metric, and a label a metric lacks, are found.
#[test]
fn the_name_check_finds_an_unknown_metric_and_a_missing_label() {
    let series = exported("report_service_tasks_total{outcome=\"answered\"} 3\nreport_service_ready 1\n");
    let used = selected(
        "sum by (reason) (rate(report_service_tasks_total{outcome=\"x\", reason=\"y\"}[5m])) + report_service_nope",
    );
    assert_eq!(used[0].0, "report_service_tasks_total");
    assert!(used[0].1.contains("reason") && !series["report_service_tasks_total"].contains("reason"));
    assert!(!series.contains_key(&used[1].0));
    assert_eq!(
        grouped_by("sum by (reason, instance) (x)"),
        BTreeSet::from(["reason".to_owned(), "instance".to_owned()])
    );
}
