//! The SAM template in `deploy/` against the code it deploys: cfn-lint finds
//! nothing, the settings exactly-once depends on hold their values, and the
//! topic rule emits exactly the record the processors read.
//!
//! The template is parsed as YAML, with CloudFormation's short-form tags
//! (`!Ref X`, `!GetAtt A.B`, `!Sub ...`) turned into their long forms
//! (`{"Ref": "X"}`, `{"Fn::GetAtt": ["A", "B"]}`, `{"Fn::Sub": ...}`), so a
//! test compares values, not substrings.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::Command;

use processors::lambda::replay::{RULE_PAYLOAD_FIELDS, rule_record};
use serde_json::{Map, Value, json};

fn template_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/template.yaml")
}

/// The template as JSON, short-form tags in their long form.
fn template() -> Value {
    let text = std::fs::read_to_string(template_path()).unwrap();
    let yaml: serde_norway::Value = serde_norway::from_str(&text).unwrap();
    long_form(yaml)
}

fn long_form(v: serde_norway::Value) -> Value {
    use serde_norway::Value as Y;
    match v {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(b),
        Y::Number(n) => serde_json::to_value(n).unwrap(),
        Y::String(s) => Value::String(s),
        Y::Sequence(items) => Value::Array(items.into_iter().map(long_form).collect()),
        Y::Mapping(m) => Value::Object(
            m.into_iter()
                .map(|(k, v)| (k.as_str().expect("string keys").to_string(), long_form(v)))
                .collect(),
        ),
        Y::Tagged(t) => {
            let name = t.tag.to_string();
            let name = name.trim_start_matches('!');
            let value = long_form(t.value);
            match (name, value) {
                // `!GetAtt Resource.Attribute` is the string form of a list.
                ("GetAtt", Value::String(s)) => {
                    let (resource, attribute) = s.split_once('.').expect("Resource.Attribute");
                    json!({"Fn::GetAtt": [resource, attribute]})
                }
                ("Ref" | "Condition", value) => json!({ name: value }),
                (other, value) => json!({ format!("Fn::{other}"): value }),
            }
        }
    }
}

fn resource<'a>(t: &'a Value, name: &str) -> &'a Value {
    let r = &t["Resources"][name];
    assert!(r.is_object(), "template.yaml has no resource {name}");
    r
}

fn get_att(resource: &str, attribute: &str) -> Value {
    json!({"Fn::GetAtt": [resource, attribute]})
}

#[test]
fn cfn_lint_reports_nothing() {
    let out = match Command::new("cfn-lint").arg(template_path()).output() {
        Ok(out) => out,
        Err(e) => panic!("cfn-lint could not run ({e}); pip install cfn-lint"),
    };
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && report.trim().is_empty(),
        "cfn-lint: {report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn short_form_tags_take_their_long_form() {
    let yaml = "a: !Ref X\nb: !GetAtt A.Arn\nc: !Sub \"${X}h\"\nd: !If [C, 1, 2]\n";
    let v = long_form(serde_norway::from_str(yaml).unwrap());
    assert_eq!(
        v,
        json!({
            "a": {"Ref": "X"},
            "b": {"Fn::GetAtt": ["A", "Arn"]},
            "c": {"Fn::Sub": "${X}h"},
            "d": {"Fn::If": ["C", 1, 2]},
        })
    );
}

#[test]
fn the_event_source_mapping_keeps_exactly_once() {
    let t = template();
    let f = resource(&t, "AggregateFunction");
    let esm = &f["Properties"]["Events"]["Telemetry"];
    assert_eq!(esm["Type"], "Kinesis");
    let p = &esm["Properties"];
    assert_eq!(p["Stream"], get_att("TelemetryStream", "Arn"));
    // Applied marks assume a shard's batches arrive in order.
    assert_eq!(p["ParallelizationFactor"], 1);
    // The handler names the first unapplied record instead of failing.
    assert_eq!(
        p["FunctionResponseTypes"],
        json!(["ReportBatchItemFailures"])
    );
    assert_eq!(p["BisectBatchOnFunctionError"], true);
    // Records never expire out of a retried batch.
    assert_eq!(p["MaximumRecordAgeInSeconds"], -1);
    assert_eq!(p["StartingPosition"], "TRIM_HORIZON");

    let rule = &resource(&t, "TelemetryRule")["Properties"]["TopicRulePayload"];
    let kinesis = &rule["Actions"][0]["Kinesis"];
    assert_eq!(kinesis["StreamName"], json!({"Ref": "TelemetryStream"}));
    // Keyed by device, so a device's records stay in order.
    assert_eq!(kinesis["PartitionKey"], "${topic(3)}");
    assert_eq!(
        rule["ErrorAction"]["Sqs"]["QueueUrl"],
        json!({"Ref": "RuleErrorQueue"})
    );

    let table = &resource(&t, "RollupTable")["Properties"];
    assert_eq!(table["TimeToLiveSpecification"]["AttributeName"], "ttl");
    assert_eq!(table["TimeToLiveSpecification"]["Enabled"], true);
}

#[test]
fn the_functions_get_every_variable_they_read() {
    let t = template();
    let globals = &t["Globals"]["Function"];
    for var in [
        "TABLE_NAME",
        "RESOLUTIONS",
        "SPAN",
        "RETENTION",
        "ALLOWED_LATENESS",
        "STREAM_RETENTION",
    ] {
        assert!(
            globals["Environment"]["Variables"][var].is_object(),
            "Globals set no {var}"
        );
    }
    assert_eq!(globals["Runtime"], "provided.al2023");
    assert_eq!(globals["Architectures"], json!(["arm64"]));
    // The query function's own, a parameter the API's parser reads.
    let query = &resource(&t, "QueryFunction")["Properties"];
    assert_eq!(
        query["Environment"]["Variables"]["STALE_AFTER"],
        json!({"Ref": "StaleAfter"})
    );
    let default = t["Parameters"]["StaleAfter"]["Default"].as_str().unwrap();
    let parsed = processors::lambda::env::stale_after_from_vars(|name| {
        (name == "STALE_AFTER").then(|| default.to_string())
    })
    .unwrap();
    assert_eq!(parsed, processors::api::StaleAfter::default());
    let replay = &resource(&t, "ReplayFunction")["Properties"];
    assert_eq!(
        replay["Environment"]["Variables"]["STREAM_NAME"],
        json!({"Ref": "TelemetryStream"})
    );
    for f in [
        "AggregateFunction",
        "AlertsFunction",
        "QueryFunction",
        "ReplayFunction",
    ] {
        assert!(
            resource(&t, f)["Properties"].get("Runtime").is_none(),
            "{f} overrides the runtime"
        );
    }
}

#[test]
fn every_function_is_a_binary_that_build_sh_packs() {
    let t = template();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let build = std::fs::read_to_string(root.join("../deploy/build.sh")).unwrap();
    let mut functions = Vec::new();
    for (name, r) in t["Resources"].as_object().unwrap() {
        if r["Type"] != "AWS::Serverless::Function" {
            continue;
        }
        let code = r["Properties"]["CodeUri"].as_str().unwrap();
        let bin = code
            .strip_prefix("dist/")
            .and_then(|c| c.strip_suffix(".zip"))
            .unwrap_or_else(|| panic!("{name}: CodeUri {code} is not dist/<bin>.zip"));
        assert!(
            root.join(format!("src/bin/{bin}.rs")).is_file(),
            "{name} deploys {bin}, which is no binary of processors"
        );
        assert!(
            build.contains(&format!("--bin {bin}")),
            "build.sh does not build {bin}"
        );
        functions.push(bin.to_string());
    }
    functions.sort();
    assert_eq!(functions, ["aggregate", "alerts", "query", "replay"]);
}

#[test]
fn the_alerts_function_runs_every_minute_alone_and_publishes_to_its_topic() {
    use processors::lambda::alerts::AlertsFunctionConfig;
    use processors::lambda::env::FromEnv;

    let t = template();
    let f = &resource(&t, "AlertsFunction")["Properties"];
    let schedule = &f["Events"]["EveryMinute"];
    assert_eq!(schedule["Type"], "Schedule");
    assert_eq!(schedule["Properties"]["Schedule"], "rate(1 minute)");
    // Two passes at once would publish the same alert twice.
    assert_eq!(f["ReservedConcurrentExecutions"], 1);
    let vars = &f["Environment"]["Variables"];
    assert_eq!(vars["ALERTS_TOPIC_ARN"], json!({"Ref": "AlertsTopic"}));
    assert_eq!(vars["ALERT_RULES"], json!({"Ref": "AlertRules"}));
    assert_eq!(resource(&t, "AlertsTopic")["Type"], "AWS::SNS::Topic");
    let policy =
        resource(&t, "AlertsRole")["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]
            .to_string();
    assert!(policy.contains("sns:Publish"), "{policy}");
    // The parameter's default is a configuration the function starts with.
    let default = t["Parameters"]["AlertRules"]["Default"].as_str().unwrap();
    let config = AlertsFunctionConfig::from_vars(|name| match name {
        "TABLE_NAME" => Some("rollups".into()),
        "ALERTS_TOPIC_ARN" => Some("arn:aws:sns:us-east-1:123456789012:alerts".into()),
        "ALERT_RULES" => Some(default.into()),
        _ => None,
    })
    .unwrap();
    assert!(config.setup.rules.is_empty());
}

#[test]
fn rule_errors_are_replayed_and_undecodable_ones_dead_lettered() {
    let t = template();
    let f = &resource(&t, "ReplayFunction")["Properties"];
    let source = &f["Events"]["RuleErrors"];
    assert_eq!(source["Type"], "SQS");
    assert_eq!(
        source["Properties"]["Queue"],
        get_att("RuleErrorQueue", "Arn")
    );
    assert_eq!(
        source["Properties"]["FunctionResponseTypes"],
        json!(["ReportBatchItemFailures"])
    );
    let queue = &resource(&t, "RuleErrorQueue")["Properties"];
    assert_eq!(
        queue["RedrivePolicy"]["deadLetterTargetArn"],
        get_att("RuleErrorDeadLetterQueue", "Arn")
    );
    assert!(queue["RedrivePolicy"]["maxReceiveCount"].as_u64().unwrap() >= 1);
    // Lambda's advice for an SQS source: a visibility timeout of at least
    // six times the function's, or a slow batch is handed out twice.
    let timeout = f["Timeout"].as_u64().unwrap();
    assert!(queue["VisibilityTimeout"].as_u64().unwrap() >= 6 * timeout);

    let statements =
        &resource(&t, "ReplayRole")["Properties"]["Policies"][0]["PolicyDocument"]["Statement"];
    let may = |action: &str, on: &Value| {
        statements.as_array().unwrap().iter().any(|s| {
            let actions = &s["Action"];
            (actions == action
                || actions
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x == action)))
                && &s["Resource"] == on
        })
    };
    assert!(may(
        "kinesis:PutRecords",
        &get_att("TelemetryStream", "Arn")
    ));
    assert!(may("sqs:ReceiveMessage", &get_att("RuleErrorQueue", "Arn")));
}

#[test]
fn the_dashboard_and_the_api_share_one_iam_authorised_api() {
    let t = template();
    let api = &resource(&t, "QueryApi")["Properties"]["Auth"];
    assert_eq!(api["DefaultAuthorizer"], "AWS_IAM");
    let events = resource(&t, "QueryFunction")["Properties"]["Events"]
        .as_object()
        .unwrap();
    let mut routes: Vec<(&str, &str)> = events
        .values()
        .map(|e| {
            assert_eq!(e["Type"], "HttpApi");
            let p = &e["Properties"];
            assert_eq!(p["ApiId"], json!({"Ref": "QueryApi"}));
            // No route opts out of the default authorizer.
            assert!(p.get("Auth").is_none(), "{e}");
            (p["Path"].as_str().unwrap(), p["Method"].as_str().unwrap())
        })
        .collect();
    routes.sort();
    assert_eq!(routes, [("/", "GET"), ("/{proxy+}", "GET")]);
}

#[test]
fn the_query_function_may_not_scan() {
    let t = template();
    let statements =
        &resource(&t, "QueryRole")["Properties"]["Policies"][0]["PolicyDocument"]["Statement"];
    let actions: Vec<&str> = statements
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| match &s["Action"] {
            Value::Array(a) => a.iter().map(|x| x.as_str().unwrap()).collect(),
            one => vec![one.as_str().unwrap()],
        })
        .filter(|a| a.starts_with("dynamodb:"))
        .collect();
    assert_eq!(actions, ["dynamodb:GetItem", "dynamodb:Query"]);
}

// ---- The topic rule's output ---------------------------------------------

/// The rule's SQL, its projection list and its topic filter.
struct RuleSql {
    /// (expression, output name) per item of the SELECT list.
    items: Vec<(String, String)>,
    from: String,
}

fn rule_sql(t: &Value) -> RuleSql {
    let sql = resource(t, "TelemetryRule")["Properties"]["TopicRulePayload"]["Sql"]
        .as_str()
        .unwrap();
    let rest = sql.strip_prefix("SELECT ").expect("SELECT ...");
    let (list, from) = rest.split_once(" FROM ").expect("... FROM ...");
    let mut items = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in list.char_indices().chain([(list.len(), ',')]) {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                let item = list[start..i].trim();
                let (expr, name) = match item.split_once(" AS ") {
                    Some((e, n)) => (e.trim(), n.trim()),
                    None => (item, item),
                };
                items.push((expr.to_string(), name.to_string()));
                start = i + 1;
            }
            _ => {}
        }
    }
    RuleSql {
        items,
        from: from.trim().to_string(),
    }
}

/// What the rule emits for `payload` published on `topic` at `now`, by the
/// documented semantics of IoT SQL's SELECT: `*` is every key of the
/// payload, `topic(n)` the topic's n-th level, `timestamp()` the rule's
/// clock, a bare name that key of the payload, left out when the payload
/// lacks it. Which item wins when two emit the same key is not documented,
/// so a clash fails the test instead of being guessed.
fn evaluate(sql: &RuleSql, topic: &str, payload: &Value, now: i64) -> Value {
    let levels: Vec<&str> = topic.split('/').collect();
    let fields = payload.as_object().unwrap();
    let mut out = Map::new();
    let mut emit = |name: &str, v: Value| {
        assert!(
            out.insert(name.to_string(), v).is_none(),
            "`{name}` is emitted twice: which value wins is undefined"
        );
    };
    for (expr, name) in &sql.items {
        if expr == "*" {
            for (k, v) in fields {
                emit(k, v.clone());
            }
        } else if expr == "timestamp()" {
            emit(name, json!(now));
        } else if let Some(n) = expr
            .strip_prefix("topic(")
            .and_then(|r| r.strip_suffix(')'))
        {
            let n: usize = n.parse().unwrap();
            emit(name, json!(levels[n - 1]));
        } else if expr.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            if let Some(v) = fields.get(expr) {
                emit(name, v.clone());
            }
        } else {
            panic!("the model knows no `{expr}`");
        }
    }
    Value::Object(out)
}

#[test]
fn the_rule_names_exactly_what_the_processors_read() {
    let sql = rule_sql(&template());
    assert_eq!(sql.from, "'dt/+/+/telemetry'");
    let mut expected: Vec<(String, String)> = RULE_PAYLOAD_FIELDS
        .iter()
        .map(|f| (f.to_string(), f.to_string()))
        .collect();
    expected.extend(
        [
            ("topic(3)", "device_id"),
            ("topic(2)", "fleet"),
            ("timestamp()", "received_at"),
        ]
        .map(|(e, n)| (e.to_string(), n.to_string())),
    );
    assert_eq!(sql.items, expected);
}

#[test]
fn a_payload_cannot_name_its_own_device_fleet_or_arrival() {
    let sql = rule_sql(&template());
    let topic = "dt/plant-a/dev-1/telemetry";
    let now = 1_764_240_000_900;
    for payload in [
        json!({"seq": 3, "ts": 1_764_240_000_123_i64, "metrics": {"t": 21.5},
            "device_id": "dev-2", "fleet": "plant-b", "received_at": 1}),
        json!({"readings": [{"seq": 1, "ts": 1_764_240_000_000_i64, "metrics": {"t": 1}}],
            "device_id": "dev-2"}),
    ] {
        let emitted = evaluate(&sql, topic, &payload, now);
        let record = schemas::decode_rule_json(emitted.to_string().as_bytes()).unwrap();
        assert_eq!(record.device_id, "dev-1", "{emitted}");
        assert_eq!(record.fleet, "plant-a", "{emitted}");
        assert_eq!(record.received_at, now, "{emitted}");
        // The replay function rebuilds exactly what the rule emits.
        let replayed = rule_record(topic, payload.to_string().as_bytes(), now).unwrap();
        assert_eq!(replayed.partition_key, "dev-1");
        let replayed: Value = serde_json::from_slice(&replayed.data).unwrap();
        assert_eq!(replayed, emitted);
    }
}

/// IoT Core's lifecycle events reach the same stream, keyed by device, in
/// the shape the stream's decoder reads as presence.
#[test]
fn lifecycle_events_feed_the_stream_keyed_by_device() {
    let t = template();
    let rule = &resource(&t, "PresenceRule")["Properties"]["TopicRulePayload"];
    let sql = rule["Sql"].as_str().unwrap();
    assert!(sql.ends_with("FROM '$aws/events/presence/+/+'"), "{sql}");
    let kinesis = &rule["Actions"][0]["Kinesis"];
    assert_eq!(kinesis["StreamName"], json!({"Ref": "TelemetryStream"}));
    assert_eq!(kinesis["PartitionKey"], "${clientId}");
    // What the rule forwards for a disconnect decodes as presence.
    let event = br#"{"clientId": "dev-1", "timestamp": 1764240000500,
        "eventType": "disconnected", "disconnectReason": "CONNECTION_LOST"}"#;
    let Ok(schemas::StreamRecord::Presence(p)) = schemas::decode_record(event) else {
        panic!("not read as presence")
    };
    assert!(p.event.is_offline());
    for field in ["clientId", "timestamp", "eventType", "disconnectReason"] {
        assert!(sql.contains(field), "{sql} lacks {field}");
    }
}
