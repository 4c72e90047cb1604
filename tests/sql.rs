//! Every ClickHouse statement Edgewise runs — migrations, gate, skew and traffic-summary
//! queries, and every Grafana panel and variable query with the data source's macros
//! expanded — runs on Debian's ClickHouse 18.16 (a real server) and on a current engine
//! (chdb), with the columns each panel needs. The dashboards are checked against Grafana's dashboard model.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use edgewise_operator::telemetry::gates::{
    INFERENCE_METRICS_SQL, INSTALL_METRICS_SQL, POLICY_ACKS_SQL, SEGMENT_DEVICES_SQL,
    VERSION_SKEW_SQL,
};
use edgewise_operator::telemetry::ingest::{SinkConfig, TelemetrySink};
use edgewise_operator::telemetry::rows::DeviceStatusRow;
use edgewise_operator::telemetry::schema::{MIGRATIONS, MIGRATIONS_TABLE};
use edgewise_operator::telemetry::summary::{TARGETS_SQL, TOTALS_SQL};
use edgewise_proto::fleet::{InferenceEvent, ModelEvent, ModelEventKind, TelemetryBatch};
use edgewise_tests::*;
use serde_json::Value;

/// Seeded events end an hour ago; queries cover the last 6 hours.
static AT: std::sync::LazyLock<i64> = std::sync::LazyLock::new(|| unix_now() - 3600);

fn at() -> i64 {
    *AT
}
fn from() -> i64 {
    at() - 5 * 3600
}
fn to() -> i64 {
    at() + 3600
}

fn dashboards() -> Vec<(String, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/edgewise/dashboards");
    let mut out: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .expect("dashboards dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("reads");
            (
                p.file_name().expect("name").to_string_lossy().into_owned(),
                serde_json::from_str(&text).expect("valid JSON"),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The grafana-clickhouse-datasource macros and dashboard variables, expanded as Grafana
/// would for the range [from(), to()] with a one-minute interval.
fn expand(sql: &str) -> String {
    let mut s = sql.to_owned();
    while let Some(start) = s.find("$__timeFilter(") {
        let end = start + s[start..].find(')').expect("closing paren");
        let col = &s[start + "$__timeFilter(".len()..end];
        let replacement = format!(
            "{col} >= toDateTime({}) AND {col} <= toDateTime({})",
            from(),
            to()
        );
        s.replace_range(start..=end, &replacement);
    }
    s.replace("$__fromTime", &format!("toDateTime({})", from()))
        .replace("$__toTime", &format!("toDateTime({})", to()))
        .replace("$__interval_s", "60")
        .replace("${deprecated:singlequote}", "'1.0.0'")
        .replace("$rollout", "fleet/assistant")
        .replace("$model", "assistant")
}

fn binds(sql: &str, values: &[&str]) -> String {
    let mut out = String::new();
    let mut values = values.iter();
    for (i, part) in sql.split('?').enumerate() {
        if i > 0 {
            out.push_str(values.next().expect("enough values"));
        }
        out.push_str(part);
    }
    out
}

fn inference(
    id: &str,
    version: &str,
    t: i64,
    on_device: bool,
    ok: bool,
    shadow: i32,
    data_class: &str,
) -> InferenceEvent {
    InferenceEvent {
        event_id: id.into(),
        time_unix_ms: t * 1000,
        model: "assistant".into(),
        version: version.into(),
        variant: "cpu".into(),
        target: if on_device { "on-device" } else { "cloud" }.into(),
        on_device,
        rule: "default".into(),
        policy_version: "p1".into(),
        latency_ms: if on_device { 40.0 } else { 250.0 },
        ok,
        fallback_used: !ok,
        input_tokens: 100,
        output_tokens: 50,
        cost_usd: if on_device { 0.0 } else { 0.0003 },
        shadow,
        task: "chat".into(),
        data_class: data_class.into(),
        rollout: "fleet/assistant".into(),
        ..InferenceEvent::default()
    }
}

/// Seeds the 18.16 server through the real ingest path.
async fn seed(ch: &ClickHouse) {
    let sink = TelemetrySink::start(ch.client.clone(), SinkConfig::default());
    for d in 0..4 {
        let device = format!("dev-{d}");
        let version = if d < 2 { "1.0.0" } else { "2.0.0" };
        let events = (0..20)
            .map(|i| {
                inference(
                    &format!("{device}-{i}"),
                    version,
                    at() - i * 60,
                    i % 3 != 0,
                    i % 7 != 0,
                    (i % 3) as i32,
                    if i % 5 == 0 { "private" } else { "public" },
                )
            })
            .collect();
        let models = vec![ModelEvent {
            event_id: format!("{device}-m"),
            time_unix_ms: at() * 1000,
            kind: if d == 3 {
                ModelEventKind::InstallFailed
            } else {
                ModelEventKind::Activated
            } as i32,
            model: "assistant".into(),
            version: version.into(),
            variant: "cpu".into(),
            error: if d == 3 {
                "SHA-256 mismatch".into()
            } else {
                String::new()
            },
            rollout: "fleet/assistant".into(),
            ..ModelEvent::default()
        }];
        let batch = TelemetryBatch {
            batch_id: format!("{device}-b"),
            device_id: device.clone(),
            inference: events,
            model_events: models,
            dropped_events: u64::from(d == 1) * 7,
        };
        sink.submit(&device, &batch).await.expect("stored");
        sink.device_status(DeviceStatusRow {
            device_id: device,
            updated_at: at() as u32,
            updated_ms: at() as u64 * 1000,
            connected: 1,
            agent_version: "0.1.0".into(),
            installed_models: vec!["assistant".into()],
            installed_versions: vec![version.into()],
            connects: 2,
            ..DeviceStatusRow::default()
        });
    }
    eventually(
        std::time::Duration::from_secs(10),
        "device status flushed",
        || async {
            (ch.count("SELECT count() FROM edgewise.device_status FINAL")
                .await
                == 4)
                .then_some(())
        },
    )
    .await;
}

/// The same seed as SQL, for chdb.
fn seed_sql() -> Vec<String> {
    let mut out = Vec::new();
    for d in 0..4 {
        let device = format!("dev-{d}");
        let version = if d < 2 { "1.0.0" } else { "2.0.0" };
        for i in 0..20i64 {
            let on_device = u8::from(i % 3 != 0);
            let ok = u8::from(i % 7 != 0);
            let shadow = ["none", "agree", "disagree"][(i % 3) as usize];
            let class = if i % 5 == 0 { "private" } else { "public" };
            let cost = if on_device == 1 { 0.0 } else { 0.0003 };
            out.push(format!(
                "INSERT INTO edgewise.inference_events (time, time_ms, device_id, event_id, batch_id, rollout, model, version, variant, target, on_device, rule, policy_version, latency_ms, ok, fallback_used, error, input_tokens, output_tokens, cost_usd, shadow, task, data_class, received_at) VALUES \
                 (toDateTime({t}), {ms}, '{device}', '{device}-{i}', 'b', 'fleet/assistant', 'assistant', '{version}', 'cpu', '{target}', {on_device}, 'default', 'p1', {lat}, {ok}, {fb}, '', 100, 50, {cost}, '{shadow}', 'chat', '{class}', toDateTime({at}))",
                t = at() - i * 60,
                ms = (at() - i * 60) * 1000,
                at = at(),
                target = if on_device == 1 { "on-device" } else { "cloud" },
                lat = if on_device == 1 { 40.0 } else { 250.0 },
                fb = 1 - ok,
            ));
        }
        out.push(format!(
            "INSERT INTO edgewise.model_events (time, time_ms, device_id, event_id, batch_id, rollout, kind, model, version, variant, duration_ms, bytes, error, received_at) VALUES \
             (toDateTime({at}), {ms}, '{device}', '{device}-m', 'b', 'fleet/assistant', '{kind}', 'assistant', '{version}', 'cpu', 0, 0, '', toDateTime({at}))",
            at = at(),
            ms = at() * 1000,
            kind = if d == 3 { "install_failed" } else { "activated" },
        ));
        out.push(format!(
            "INSERT INTO edgewise.device_status (device_id, updated_at, updated_ms, connected, agent_version, os, arch, memory_mib, accelerators, label_keys, label_values, installed_models, installed_versions, policy_version, connects, gateway) VALUES \
             ('{device}', toDateTime({at}), {ms}, 1, '0.1.0', 'linux', 'x86_64', 4096, [], [], [], ['assistant'], ['{version}'], 'p1', 2, 'g')",
            at = at(),
            ms = at() * 1000,
        ));
        out.push(format!(
            "INSERT INTO edgewise.telemetry_batches (device_id, batch_id, received_at, inference_events, model_events, dropped_events, gateway) VALUES ('{device}', '{device}-b', toDateTime({at}), 20, 1, {dropped}, 'g')",
            at = at(),
            dropped = u64::from(d == 1) * 7,
        ));
    }
    out
}

/// Every query to check: (name, SQL, panel type if a panel).
fn queries() -> Vec<(String, String, Option<String>)> {
    let gate = |sql: &str| {
        binds(
            sql,
            &[
                "'fleet/assistant'",
                "'assistant'",
                "'2.0.0'",
                &from().to_string(),
                &to().to_string(),
            ],
        )
    };
    let mut out = vec![
        (
            "gates: inference".to_owned(),
            gate(INFERENCE_METRICS_SQL),
            None,
        ),
        (
            "gates: installs".to_owned(),
            gate(INSTALL_METRICS_SQL),
            None,
        ),
        (
            "version skew".to_owned(),
            binds(VERSION_SKEW_SQL, &["'assistant'", "'assistant'"]),
            None,
        ),
        (
            "segment devices".to_owned(),
            binds(SEGMENT_DEVICES_SQL, &["'assistant'", "'assistant'"]),
            None,
        ),
        (
            "policy acks".to_owned(),
            binds(POLICY_ACKS_SQL, &["'p1'"]),
            None,
        ),
        (
            "traffic summary: targets".to_owned(),
            binds(TARGETS_SQL, &["'assistant'", &from().to_string()]),
            None,
        ),
        (
            "traffic summary: totals".to_owned(),
            binds(TOTALS_SQL, &["'assistant'", &from().to_string()]),
            None,
        ),
    ];
    for (file, d) in dashboards() {
        for v in d["templating"]["list"].as_array().expect("templating") {
            if v["type"] == "query" {
                out.push((
                    format!("{file} variable {}", v["name"]),
                    expand(v["query"].as_str().expect("query")),
                    None,
                ));
            }
        }
        for p in d["panels"].as_array().expect("panels") {
            for t in p["targets"].as_array().expect("targets") {
                out.push((
                    format!("{file} panel {:?}", p["title"].as_str().unwrap_or_default()),
                    expand(t["rawSql"].as_str().expect("rawSql")),
                    p["type"].as_str().map(str::to_owned),
                ));
            }
        }
    }
    out
}

#[derive(Debug, serde::Deserialize)]
struct Compact {
    meta: Vec<Column>,
    data: Vec<Value>,
}

#[derive(Debug, serde::Deserialize)]
struct Column {
    name: String,
    #[serde(rename = "type")]
    kind: String,
}

async fn run(ch: &ClickHouse, sql: &str) -> Result<Compact, String> {
    let mut cursor = ch
        .client
        .query(sql)
        .fetch_bytes("JSONCompact")
        .map_err(|e| e.to_string())?;
    let bytes = cursor.collect().await.map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&bytes)))
}

fn numeric(kind: &str) -> bool {
    ["Int", "UInt", "Float", "Decimal"]
        .iter()
        .any(|p| kind.starts_with(p) || kind.starts_with(&format!("Nullable({p}")))
}

/// The columns a Grafana panel of `kind` needs.
fn check_columns(name: &str, kind: &str, cols: &[Column]) {
    let has_time = cols.iter().any(|c| c.kind.starts_with("DateTime"));
    let has_number = cols.iter().any(|c| numeric(&c.kind));
    let has_string = cols
        .iter()
        .any(|c| c.kind == "String" || c.kind.starts_with("Enum"));
    match kind {
        "timeseries" => assert!(
            has_time && has_number,
            "{name}: a time series needs a time and a number column: {cols:?}"
        ),
        "stat" => assert!(has_number, "{name}: a stat needs a number column: {cols:?}"),
        "piechart" | "barchart" => assert!(
            has_string && has_number,
            "{name}: needs a label and a number column: {cols:?}"
        ),
        "table" => assert!(!cols.is_empty(), "{name}: no columns"),
        other => panic!("{name}: unexpected panel type {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_statement_and_panel_query_runs_on_clickhouse_18_16_and_a_current_engine() {
    let ch = ClickHouse::start().await;
    seed(&ch).await;
    let mut columns_18 = BTreeMap::new();
    for (name, sql, panel) in queries() {
        let result = run(&ch, &sql)
            .await
            .unwrap_or_else(|e| panic!("{name} fails on 18.16: {e}\n{sql}"));
        if let Some(kind) = &panel {
            check_columns(&name, kind, &result.meta);
            assert!(
                !result.data.is_empty(),
                "{name} returns no rows on the seeded data\n{sql}"
            );
        }
        columns_18.insert(
            name,
            result
                .meta
                .iter()
                .map(|c| c.name.clone())
                .collect::<Vec<_>>(),
        );
    }

    // The same on a current engine: DDL (including TTL), the seed, every query.
    let mut statements: Vec<Value> = vec![
        serde_json::json!({"sql": "CREATE DATABASE IF NOT EXISTS edgewise", "query": false}),
        serde_json::json!({"sql": MIGRATIONS_TABLE, "query": false}),
    ];
    for m in MIGRATIONS {
        for s in m.statements {
            statements.push(serde_json::json!({"sql": s, "query": false}));
        }
    }
    for s in seed_sql() {
        statements.push(serde_json::json!({"sql": s, "query": false}));
    }
    let names: Vec<(String, Option<String>)> =
        queries().into_iter().map(|(n, _, p)| (n, p)).collect();
    for (_, sql, _) in queries() {
        statements.push(serde_json::json!({"sql": sql, "query": true}));
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/chdb_check.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    std::io::Write::write_all(
        child.stdin.as_mut().expect("stdin"),
        serde_json::to_vec(&statements).expect("json").as_slice(),
    )
    .expect("writes");
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("finishes");
    assert!(
        out.status.success(),
        "chdb check failed (the test command installs chdb-core): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<Value> = serde_json::from_slice(&out.stdout).expect("json");
    let failures: Vec<String> = statements
        .iter()
        .zip(&results)
        .filter(|(_, r)| r["ok"] != true)
        .map(|(s, r)| format!("{}\n  -> {}", s["sql"], r["error"]))
        .collect();
    assert!(
        failures.is_empty(),
        "fails on a current engine:\n{}",
        failures.join("\n")
    );
    let query_results = &results[results.len() - names.len()..];
    for ((name, panel), r) in names.iter().zip(query_results) {
        let cols: Vec<String> = r["columns"]
            .as_array()
            .expect("columns")
            .iter()
            .map(|c| c.as_str().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(
            &cols, &columns_18[name],
            "{name}: the same columns on both engines"
        );
        if panel.is_some() {
            assert!(
                r["rows"].as_u64().unwrap_or(0) > 0,
                "{name} returns no rows on the current engine"
            );
        }
    }
}

#[test]
fn dashboards_follow_grafanas_dashboard_model() {
    let ds_types: BTreeSet<&str> = ["timeseries", "stat", "table", "piechart", "barchart"].into();
    let all = dashboards();
    let titles: Vec<&str> = all
        .iter()
        .map(|(_, d)| d["title"].as_str().expect("title"))
        .collect();
    assert_eq!(
        titles,
        [
            "Edgewise / Fleet",
            "Edgewise / Reliability",
            "Edgewise / Rollouts",
            "Edgewise / Routing and cost"
        ]
    );
    let mut uids = BTreeSet::new();
    for (file, d) in &all {
        let uid = d["uid"].as_str().expect("uid");
        assert!(
            !uid.is_empty() && uid.len() <= 40 && uids.insert(uid),
            "{file}: uid must be unique and ≤ 40 chars"
        );
        assert!(
            d["schemaVersion"].as_u64().expect("schemaVersion") >= 36,
            "{file}"
        );
        for key in ["time", "templating", "panels", "tags"] {
            assert!(!d[key].is_null(), "{file}: {key} is required");
        }
        let vars: BTreeMap<&str, &str> = d["templating"]["list"]
            .as_array()
            .expect("list")
            .iter()
            .map(|v| {
                (
                    v["name"].as_str().expect("name"),
                    v["type"].as_str().expect("type"),
                )
            })
            .collect();
        assert_eq!(
            vars.get("datasource"),
            Some(&"datasource"),
            "{file}: a ClickHouse data source variable"
        );
        let mut ids = BTreeSet::new();
        for p in d["panels"].as_array().expect("panels") {
            let title = p["title"].as_str().expect("title");
            assert!(
                ids.insert(p["id"].as_u64().expect("id")),
                "{file}/{title}: duplicate panel id"
            );
            assert!(
                ds_types.contains(p["type"].as_str().expect("type")),
                "{file}/{title}: panel type"
            );
            let g = &p["gridPos"];
            let (x, w, h) = (
                g["x"].as_u64().expect("x"),
                g["w"].as_u64().expect("w"),
                g["h"].as_u64().expect("h"),
            );
            assert!(
                w > 0 && h > 0 && x + w <= 24,
                "{file}/{title}: gridPos within 24 columns"
            );
            assert_eq!(
                p["datasource"]["type"], "grafana-clickhouse-datasource",
                "{file}/{title}"
            );
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{file}/{title}");
            for t in p["targets"].as_array().expect("targets") {
                assert_eq!(t["refId"], "A");
                let sql = t["rawSql"].as_str().expect("rawSql");
                // Every $variable used is defined (macros start with $__).
                for word in sql
                    .split(|c: char| !(c.is_alphanumeric() || c == '$' || c == '_' || c == '{'))
                    .filter(|w| w.starts_with('$') && !w.starts_with("$__"))
                {
                    let name = word.trim_start_matches("${").trim_start_matches('$');
                    assert!(
                        vars.contains_key(name),
                        "{file}/{title}: undefined variable {word}"
                    );
                }
            }
        }
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}
