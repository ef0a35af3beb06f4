//! OpenTelemetry: the span tree a real OTLP/HTTP receiver decodes, and W3C trace context
//! from the client through to the provider. The receiver is a small HTTP server decoding the
//! protobuf with the generated classes of the official `opentelemetry-proto` package, and
//! refusing any field it does not know, so a wrong field number or wire type fails here.

use crate::clients::{have, python};
use crate::harness::*;
use serde_json::{json, Value};
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Duration;

const RECEIVER: &str = r#"
import sys, json, http.server
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts
from google.protobuf.unknown_fields import UnknownFieldSet

refuse_first = int(sys.argv[1])
seen = {"posts": 0}

def strict(m, path="request"):
    # A field the official schema does not know is an encoding bug in the exporter.
    if len(UnknownFieldSet(m)) > 0:
        raise ValueError("unknown fields in " + path)
    for f, v in m.ListFields():
        if f.type == f.TYPE_MESSAGE:
            for item in (v if f.is_repeated else [v]):
                strict(item, path + "." + f.name)

def value(v):
    k = v.WhichOneof("value")
    if k == "array_value":
        return [value(x) for x in v.array_value.values]
    return getattr(v, k)

class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        seen["posts"] += 1
        if seen["posts"] <= refuse_first:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        try:
            req = ts.ExportTraceServiceRequest.FromString(body)
            strict(req)
        except Exception as e:
            print(json.dumps({"error": repr(e)}), flush=True)
            self.send_response(400)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        spans = []
        for rs in req.resource_spans:
            resource = {kv.key: value(kv.value) for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append({
                        "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                        "parent_span_id": s.parent_span_id.hex(), "name": s.name,
                        "kind": s.kind, "start": s.start_time_unix_nano,
                        "end": s.end_time_unix_nano, "flags": s.flags,
                        "trace_state": s.trace_state,
                        "attrs": {kv.key: value(kv.value) for kv in s.attributes},
                        "status": {"code": s.status.code, "message": s.status.message},
                        "resource": resource, "scope": ss.scope.name,
                    })
        print(json.dumps({"path": self.path, "content_type": self.headers["Content-Type"],
                          "auth": self.headers.get("x-otlp-token"), "spans": spans}), flush=True)
        out = ts.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    def log_message(self, *a):
        pass

srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(json.dumps({"port": srv.server_address[1]}), flush=True)
srv.serve_forever()
"#;

/// The receiver process and the exports it decoded, one JSON line each.
struct Receiver {
    _child: KillOnDrop,
    url: String,
    lines: std::sync::mpsc::Receiver<Value>,
    spans: Vec<Value>,
    exports: Vec<Value>,
}

impl Receiver {
    fn start(refuse_first: u32) -> Receiver {
        let mut child = Command::new(python())
            .args(["-c", RECEIVER, &refuse_first.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if tx
                    .send(serde_json::from_str::<Value>(&line).unwrap())
                    .is_err()
                {
                    return;
                }
            }
        });
        let first = lines.recv_timeout(Duration::from_secs(20)).unwrap();
        Receiver {
            _child: KillOnDrop(Some(child)),
            url: format!("http://127.0.0.1:{}", first["port"]),
            lines,
            spans: Vec::new(),
            exports: Vec::new(),
        }
    }

    /// The spans of `trace_id` once `n` of them have arrived.
    async fn trace(&mut self, trace_id: &str, n: usize) -> Vec<Value> {
        let of = |spans: &[Value]| -> Vec<Value> {
            spans
                .iter()
                .filter(|s| s["trace_id"] == trace_id)
                .cloned()
                .collect()
        };
        for _ in 0..200 {
            while let Ok(export) = self.lines.try_recv() {
                assert!(
                    export["error"].is_null(),
                    "the receiver could not decode: {export}"
                );
                self.spans
                    .extend(export["spans"].as_array().unwrap().iter().cloned());
                self.exports.push(export);
            }
            let got = of(&self.spans);
            if got.len() >= n {
                assert_eq!(got.len(), n, "{got:#?}");
                return got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("trace {trace_id}: {:#?}", of(&self.spans));
    }
}

fn named<'a>(spans: &'a [Value], name: &str) -> Vec<&'a Value> {
    spans.iter().filter(|s| s["name"] == name).collect()
}

fn one<'a>(spans: &'a [Value], name: &str) -> &'a Value {
    let found = named(spans, name);
    assert_eq!(found.len(), 1, "{name} in {spans:#?}");
    found[0]
}

/// A call with the caller's `traceparent`.
async fn traced(
    gw: &TestGateway,
    key: &str,
    path: &str,
    traceparent: &str,
    body: Value,
) -> reqwest::Response {
    gw.client
        .post(format!("{}{path}", gw.url))
        .bearer_auth(key)
        .header("traceparent", traceparent)
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// The trace context of the latest request the mock saw.
async fn last_seen(mock: &str) -> Value {
    let seen = mock_stats(mock).await["traces"].clone();
    seen.as_array().unwrap().last().unwrap().clone()
}

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn config(mock: &str, dead: &str, receiver: &str) -> String {
    format!(
        r#"
        [routing]
        max_attempts = 3
        backoff_base = "5ms"
        backoff_max = "20ms"
        [otel]
        endpoint = "{receiver}"
        flush_interval = "50ms"
        resource = {{ "deployment.environment.name" = "test" }}
        headers_env = {{ "x-otlp-token" = "CARGO_PKG_NAME" }}
        [[providers]]
        name = "up"
        kind = "openai"
        base_url = "{mock}"
        [[providers]]
        name = "down"
        kind = "openai"
        base_url = "{dead}"
        connect_timeout = "300ms"
        [[models]]
        name = "agent-model"
        deployments = [{{ provider = "up", model = "mock" }}]
        [[models]]
        name = "failover"
        deployments = [
          {{ provider = "down", model = "mock", priority = 0 }},
          {{ provider = "up", model = "mock", priority = 1 }},
        ]
        [[routes]]
        name = "lookup"
        path = "/tools/lookup"
        upstream = "{mock}/chat/completions"
        [[prices]]
        model = "up/mock"
        input = 1000000
        output = 2000000
        [[prices]]
        model = "down/mock"
        input = 1000000
        output = 2000000
        "#
    )
}

#[tokio::test]
async fn spans_follow_the_genai_conventions_and_trace_context_reaches_the_provider() {
    if !have("opentelemetry.proto.collector.trace.v1.trace_service_pb2") {
        return;
    }
    // The collector refuses the first export (503): the exporter must retry it.
    let mut rx = Receiver::start(1);
    let mock = spawn_mock(None).await;
    let gw = TestGateway::start(&config(&mock, &dead_url().await, &rx.url)).await;
    let (key, key_id) = gw
        .create_key(json!({"name": "traced-agent", "team": "t1"}))
        .await;
    let wallet = gw.wallet(&format!("key:{key_id}"), "1.00").await;

    // 1. A JSON call inside the client's sampled trace.
    let resp = gw
        .client
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(&key)
        .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
        .header("tracestate", "vendor=abc,other=1")
        .header("x-tollgate-run", "run-7")
        .json(&json!({"model": "agent-model", "messages": user("hello there")}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let rec = gw.record_for(resp.headers()).await;
    let spans = rx.trace(CLIENT_TRACE, 4).await;
    let root = one(&spans, "chat agent-model");
    assert_eq!(root["kind"], 2, "the gateway's span is SERVER");
    assert_eq!(root["parent_span_id"], CLIENT_SPAN);
    assert_eq!(root["trace_state"], "vendor=abc,other=1");
    // Sampled, and its parent is remote (HAS_IS_REMOTE | IS_REMOTE).
    assert_eq!(root["flags"], 0x301);
    let a = &root["attrs"];
    assert_eq!(a["gen_ai.operation.name"], "chat");
    assert_eq!(a["gen_ai.provider.name"], "openai");
    assert_eq!(a["gen_ai.request.model"], "agent-model");
    assert_eq!(a["gen_ai.response.model"], "mock");
    assert_eq!(a["gen_ai.request.stream"], false);
    assert_eq!(a["gen_ai.usage.input_tokens"], rec.input_tokens);
    assert_eq!(a["gen_ai.usage.output_tokens"], rec.output_tokens);
    assert_eq!(a["gen_ai.response.finish_reasons"], json!(["stop"]));
    assert_eq!(a["http.response.status_code"], 200);
    assert_eq!(a["tollgate.request_id"], rec.id.as_str());
    assert_eq!(a["tollgate.key_id"], key_id.as_str());
    assert_eq!(a["tollgate.agent"], "traced-agent");
    assert_eq!(a["tollgate.team"], "t1");
    assert_eq!(a["tollgate.wallet_id"], wallet.as_str());
    assert_eq!(a["tollgate.run_id"], "run-7");
    assert_eq!(a["tollgate.cost_micros"], rec.cost_micros);
    assert!(rec.cost_micros > 0);
    assert_eq!(root["status"]["code"], 0, "unset on success");
    assert_eq!(root["resource"]["service.name"], "tollgate");
    assert_eq!(root["resource"]["deployment.environment.name"], "test");
    assert_eq!(root["scope"], "tollgate");

    let root_id = root["span_id"].as_str().unwrap();
    for s in &spans {
        if s["span_id"] != root_id {
            assert_eq!(s["parent_span_id"], root_id, "{s:#?}");
            assert!(s["start"].as_u64() >= root["start"].as_u64(), "{s:#?}");
            assert!(s["end"].as_u64() <= root["end"].as_u64(), "{s:#?}");
            assert_eq!(s["flags"], 0x101, "a local parent");
        }
        assert!(s["end"].as_u64() >= s["start"].as_u64());
    }
    let hold = one(&spans, "tollgate.hold");
    assert_eq!(hold["kind"], 1);
    assert_eq!(hold["attrs"]["tollgate.wallet_id"], wallet.as_str());
    assert!(hold["attrs"]["tollgate.hold_micros"].as_u64().unwrap() >= rec.cost_micros);
    let attempt = one(&spans, "chat mock");
    assert_eq!(attempt["kind"], 3, "the upstream call is CLIENT");
    assert_eq!(attempt["attrs"]["gen_ai.provider.name"], "openai");
    assert_eq!(attempt["attrs"]["tollgate.provider"], "up");
    assert_eq!(attempt["attrs"]["server.address"], "127.0.0.1");
    assert_eq!(attempt["attrs"]["http.response.status_code"], 200);
    assert!(
        attempt["start"].as_u64() >= hold["end"].as_u64(),
        "hold, then attempt"
    );
    let settle = one(&spans, "tollgate.settle");
    assert_eq!(settle["attrs"]["tollgate.cost_micros"], rec.cost_micros);
    assert!(settle["start"].as_u64() >= attempt["end"].as_u64());
    // The provider saw the attempt as its parent, in the client's trace, with its state.
    let last = last_seen(&mock).await;
    let attempt_id = attempt["span_id"].as_str().unwrap();
    assert_eq!(
        last["traceparent"],
        format!("00-{CLIENT_TRACE}-{attempt_id}-01")
    );
    assert_eq!(last["tracestate"], "vendor=abc,other=1");

    // 2. A failover: the first deployment is down, the second answers. One root, two
    //    attempts, the first in error; the provider hears from the second.
    let trace2 = "0af7651916cd43dd8448eb211c80319c";
    let resp = traced(
        &gw,
        &key,
        "/v1/chat/completions",
        &format!("00-{trace2}-b7ad6b7169203331-01"),
        json!({"model": "failover", "messages": user("again")}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let spans = rx.trace(trace2, 5).await;
    let attempts = named(&spans, "chat mock");
    assert_eq!(attempts.len(), 2, "{spans:#?}");
    let (first, second) = if attempts[0]["attrs"]["tollgate.attempt"] == 1 {
        (attempts[0], attempts[1])
    } else {
        (attempts[1], attempts[0])
    };
    assert_eq!(first["attrs"]["tollgate.provider"], "down");
    assert_eq!(first["status"]["code"], 2, "ERROR");
    assert_eq!(first["attrs"]["error.type"], "upstream_unavailable");
    assert_eq!(second["attrs"]["tollgate.provider"], "up");
    assert_eq!(second["status"]["code"], 0);
    assert!(second["start"].as_u64() >= first["end"].as_u64());
    assert_eq!(
        one(&spans, "chat failover")["attrs"]["tollgate.attempts"],
        2
    );
    assert_eq!(
        last_seen(&mock).await["traceparent"],
        format!("00-{trace2}-{}-01", second["span_id"].as_str().unwrap())
    );

    // 3. A stream with no trace context: a new trace, a root without a parent, the finish
    //    reason read from the stream, the attempt open until the stream ended.
    let resp = gw
        .chat(
            &key,
            json!({"model": "agent-model", "stream": true, "messages": user("stream it")}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let _ = sse_data(resp).await;
    let rec = wait_record(&gw, &id).await;
    let tp = last_seen(&mock).await["traceparent"]
        .as_str()
        .unwrap()
        .to_string();
    let trace3 = &tp[3..35];
    assert_ne!(trace3, CLIENT_TRACE);
    let spans = rx.trace(trace3, 4).await;
    let root = one(&spans, "chat agent-model");
    assert_eq!(root["parent_span_id"], "");
    assert_eq!(root["flags"], 0x101, "sampled, no remote parent");
    assert_eq!(root["attrs"]["gen_ai.request.stream"], true);
    assert_eq!(
        root["attrs"]["gen_ai.response.finish_reasons"],
        json!(["stop"])
    );
    assert_eq!(
        root["attrs"]["gen_ai.usage.output_tokens"],
        rec.output_tokens
    );
    let attempt = one(&spans, "chat mock");
    assert_eq!(
        tp,
        format!("00-{trace3}-{}-01", attempt["span_id"].as_str().unwrap())
    );
    assert!(attempt["end"].as_u64() >= one(&spans, "tollgate.settle")["start"].as_u64());

    // 4. A caller that did not sample: nothing is recorded, but the provider stays in the
    //    caller's trace, unsampled.
    let trace4 = "11111111111111111111111111111111";
    let resp = traced(
        &gw,
        &key,
        "/v1/chat/completions",
        &format!("00-{trace4}-2222222222222222-00"),
        json!({"model": "agent-model", "messages": user("quiet")}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let tp = last_seen(&mock).await["traceparent"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        tp.starts_with(&format!("00-{trace4}-")) && tp.ends_with("-00"),
        "{tp}"
    );
    assert!(
        !tp.contains("2222222222222222"),
        "the gateway's own span id: {tp}"
    );

    // A malformed traceparent is ignored: a new trace of the gateway's own.
    let resp = traced(
        &gw,
        &key,
        "/v1/chat/completions",
        "00-ZZZ-nope-01",
        json!({"model": "agent-model", "messages": user("bad header")}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let tp = last_seen(&mock).await["traceparent"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        tollgate::otel::parse_traceparent(tp.as_bytes()).is_some(),
        "{tp}"
    );
    rx.trace(&tp[3..35], 4).await;

    // 5. A tool route: an execute_tool span, and the tool service's parent is the call's.
    let trace5 = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";
    let resp = traced(
        &gw,
        &key,
        "/tools/lookup",
        &format!("00-{trace5}-3333333333333333-01"),
        json!({"model": "mock", "messages": user("tool call")}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let spans = rx.trace(trace5, 2).await;
    let root = spans.iter().find(|s| s["kind"] == 2).unwrap();
    let call = spans.iter().find(|s| s["kind"] == 3).unwrap();
    assert_eq!(root["name"], "execute_tool lookup");
    assert_eq!(root["parent_span_id"], "3333333333333333");
    assert_eq!(root["attrs"]["gen_ai.operation.name"], "execute_tool");
    assert_eq!(root["attrs"]["gen_ai.tool.name"], "lookup");
    assert_eq!(call["name"], "execute_tool lookup");
    assert_eq!(call["parent_span_id"], root["span_id"]);
    assert_eq!(call["attrs"]["http.response.status_code"], 200);
    assert_eq!(
        last_seen(&mock).await["traceparent"],
        format!("00-{trace5}-{}-01", call["span_id"].as_str().unwrap())
    );

    // Every export went where OTLP/HTTP says, as protobuf, with the configured header.
    for e in &rx.exports {
        assert_eq!(e["path"], "/v1/traces");
        assert_eq!(e["content_type"], "application/x-protobuf");
        assert_eq!(e["auth"], "tollgate");
    }
    assert!(rx.trace(trace4, 0).await.is_empty());

    // The GenAI metrics: billable tokens by type, durations, time to first token; models as
    // labels, never a key, run or wallet.
    let m = gw.metrics().await;
    let input_sum: u64 = gw
        .records()
        .await
        .iter()
        .filter(|r| r.model_requested.as_deref() == Some("agent-model"))
        .map(|r| r.input_tokens)
        .sum();
    let line = "gen_ai_client_token_usage_sum{gen_ai_operation_name=\"chat\",gen_ai_provider_name=\"openai\",gen_ai_token_type=\"input\",gen_ai_request_model=\"agent-model\",gen_ai_response_model=\"mock\"} ";
    let got: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix(line))
        .unwrap_or_else(|| panic!("{m}"))
        .parse()
        .unwrap();
    assert!(input_sum > 0);
    assert_eq!(got, input_sum as f64, "{m}");
    assert!(
        m.contains("gen_ai_client_operation_duration_seconds_count{"),
        "{m}"
    );
    assert!(m.contains("error_type=\"\""), "{m}");
    assert!(
        m.contains("gen_ai_server_time_to_first_token_seconds_count{gen_ai_operation_name=\"chat\",gen_ai_provider_name=\"openai\",gen_ai_request_model=\"agent-model\",gen_ai_response_model=\"mock\"} 1"),
        "{m}"
    );
    for line in m.lines().filter(|l| l.starts_with("gen_ai_")) {
        assert!(
            !line.contains(&key_id) && !line.contains(&wallet) && !line.contains("run-7"),
            "{line}"
        );
    }
    assert!(m.contains("tollgate_otel_export_errors_total 1"), "{m}");
    assert!(m.contains("tollgate_otel_spans_dropped_total 0"), "{m}");
    gw.stop().await;
}

#[tokio::test]
async fn without_otel_the_callers_trace_context_goes_upstream_unchanged() {
    let mock = spawn_mock(None).await;
    let gw = TestGateway::start(&format!(
        "[[providers]]\nname = \"up\"\nkind = \"openai\"\nbase_url = \"{mock}\"\n\
         [[models]]\nname = \"m\"\ndeployments = [{{ provider = \"up\", model = \"mock\" }}]\n"
    ))
    .await;
    let key = gw.key().await;
    let tp = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    let send = |traceparent: &'static str| {
        gw.client
            .post(format!("{}/v1/chat/completions", gw.url))
            .bearer_auth(&key)
            .header("traceparent", traceparent)
            .header("tracestate", "k=v")
            .json(&json!({"model": "m", "messages": user("hi")}))
            .send()
    };
    let leaked: &'static str = Box::leak(tp.clone().into_boxed_str());
    assert_eq!(send(leaked).await.unwrap().status(), 200);
    // An invalid one is not passed on.
    assert_eq!(send("garbage").await.unwrap().status(), 200);
    let seen = mock_stats(&mock).await["traces"].clone();
    assert_eq!(seen, json!([{"traceparent": tp, "tracestate": "k=v"}]));
    let m = gw.metrics().await;
    assert!(m.contains("gen_ai_client_token_usage_count{"), "{m}");
    gw.stop().await;
}
