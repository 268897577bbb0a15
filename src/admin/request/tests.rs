use super::*;
use crate::admin::code::AdminCode;

fn code(line: &str) -> AdminCode {
    parse(line.as_bytes()).unwrap_err().code
}

fn message(line: &str) -> String {
    parse(line.as_bytes()).unwrap_err().message
}

fn tenant(t: &str) -> TenantId {
    TenantId::parse(t).unwrap()
}

#[test]
fn parses_requests() {
    let (r, t) = parse(br#"{"cmd":"pause","tenant":"acme","timeout_ms":250,"token":"x"}"#).unwrap();
    assert_eq!(
        r,
        Request::Pause(Pause {
            tenant: tenant("acme"),
            timeout_ms: Some(250.try_into().unwrap())
        })
    );
    assert_eq!(t.as_deref(), Some("x"));
    let (r, _) =
        parse(br#"{"cmd":"tenant.set","tenant":"a","backend":"b","schema":"Weird \"S\""}"#)
            .unwrap();
    assert!(matches!(
        r,
        Request::TenantSet(ref s) if s.route().schema.as_deref() == Some("Weird \"S\"") && s.database.is_none()
    ));
    let (r, _) = parse(
        br#"{"cmd":"tenant.set","tenant":"a","backend":"b","isolation":"role","role":"t_a","tenant_column":"tid","tenant_key":"7"}"#,
    )
    .unwrap();
    let Request::TenantSet(s) = r else { panic!() };
    let route = s.route();
    assert_eq!(route.isolation, Some(Isolation::Role));
    assert_eq!(route.role.as_deref(), Some("t_a"));
    assert_eq!(route.tenant_key.as_deref(), Some("7"));
    assert_eq!(
        parse(br#"{"cmd":"audit"}"#).unwrap().0,
        Request::Audit(Audit::default())
    );
    // null is the same as absent, for flags too.
    let (r, _) = parse(br#"{"cmd":"migrate.abort","tenant":"a","drop_target":null}"#).unwrap();
    assert_eq!(
        r,
        Request::MigrateAbort(Abort {
            tenant: tenant("a"),
            drop_target: false
        })
    );
    let (r, _) = parse(br#"{"cmd":"migrate.verify","tenant":"a","level":"count,full"}"#).unwrap();
    assert!(matches!(
        r,
        Request::MigrateVerify(Verify {
            level: Some(VerifyLevel::Full),
            ..
        })
    ));
}

#[test]
fn every_refusal_has_its_code_and_names_the_argument() {
    assert_eq!(code("{"), AdminCode::BadJson);
    assert_eq!(code("[1]"), AdminCode::BadJson);
    assert_eq!(code(r#"{"cmd":"explode"}"#), AdminCode::UnknownCommand);
    assert_eq!(code(r#"{"cmd":7}"#), AdminCode::InvalidArgument);
    assert_eq!(code(r#"{"tenant":"a"}"#), AdminCode::MissingArgument);
    assert_eq!(code(r#"{"cmd":"pause"}"#), AdminCode::MissingArgument);
    assert_eq!(message(r#"{"cmd":"pause"}"#), "tenant is required");
    assert_eq!(
        code(r#"{"cmd":"pause","tenant":"a b"}"#),
        AdminCode::InvalidArgument
    );
    assert!(message(r#"{"cmd":"pause","tenant":"a b"}"#).starts_with("tenant: "));
    assert_eq!(
        code(r#"{"cmd":"pause","tenant":"a","timeout_ms":-1}"#),
        AdminCode::InvalidArgument
    );
    assert!(
        message(r#"{"cmd":"pause","tenant":"a","timeout_ms":4000000}"#).starts_with("timeout_ms: ")
    );
    assert_eq!(
        code(r#"{"cmd":"tenants","tenant":"a"}"#),
        AdminCode::InvalidArgument
    );
    assert!(message(r#"{"cmd":"tenants","tenant":"a"}"#).contains("unknown field `tenant`"));
    assert_eq!(
        code(r#"{"cmd":"tenant.set","tenant":"a","backend":"x y"}"#),
        AdminCode::InvalidArgument
    );
    assert_eq!(
        code(r#"{"cmd":"tenant.set","tenant":"a","backend":"b","schema":""}"#),
        AdminCode::InvalidArgument
    );
    assert_eq!(
        code(r#"{"cmd":"tenant.set","tenant":"a","backend":"b","isolation":"x"}"#),
        AdminCode::InvalidArgument
    );
    assert_eq!(
        code(r#"{"cmd":"audit","tail":100000000}"#),
        AdminCode::InvalidArgument
    );
    assert_eq!(
        code(r#"{"cmd":"migrate.verify","tenant":"a","level":"x"}"#),
        AdminCode::InvalidArgument
    );
    assert_eq!(
        code(r#"{"cmd":"migrate.ddl","tenant":"a","sql":" "}"#),
        AdminCode::InvalidArgument
    );
    assert_eq!(
        code(r#"{"cmd":"tenants","token":5}"#),
        AdminCode::InvalidArgument
    );
    let big = format!(
        r#"{{"cmd":"tenants","x":"{}"}}"#,
        "a".repeat(MAX_REQUEST_BYTES)
    );
    assert_eq!(code(&big), AdminCode::RequestTooLarge);
}

/// What `ctl` sends is what the server reads back, for every command.
#[test]
fn every_command_round_trips() {
    let lines = [
        r#"{"cmd":"tenants"}"#,
        r#"{"cmd":"tenant.get","tenant":"a"}"#,
        r#"{"cmd":"tenant.set","tenant":"a","backend":"b","database":"d","schema":"s","isolation":"role","role":"r","tenant_column":"c","tenant_key":"k"}"#,
        r#"{"cmd":"tenant.grants","tenant":"a","apply":true}"#,
        r#"{"cmd":"tenant.remove","tenant":"a"}"#,
        r#"{"cmd":"backends"}"#,
        r#"{"cmd":"pause","tenant":"a","timeout_ms":5}"#,
        r#"{"cmd":"resume","tenant":"a"}"#,
        r#"{"cmd":"stats"}"#,
        r#"{"cmd":"reload"}"#,
        r#"{"cmd":"audit","tail":3}"#,
        r#"{"cmd":"migrate.start","tenant":"a","to":"b","database":"d","schema":"s","verify":"hash","cutover":"auto","allow_existing":true,"tenant_column":"c","tenant_key":"k"}"#,
        r#"{"cmd":"migrate.status"}"#,
        r#"{"cmd":"migrate.status","tenant":"a"}"#,
        r#"{"cmd":"migrate.cutover","tenant":"a"}"#,
        r#"{"cmd":"migrate.abort","tenant":"a","drop_target":true}"#,
        r#"{"cmd":"migrate.pause","tenant":"a"}"#,
        r#"{"cmd":"migrate.resume","tenant":"a"}"#,
        r#"{"cmd":"migrate.verify","tenant":"a","level":"full"}"#,
        r#"{"cmd":"migrate.repair","tenant":"a"}"#,
        r#"{"cmd":"migrate.ddl","tenant":"a","sql":"ALTER TABLE t ADD c int"}"#,
        r#"{"cmd":"migrate.rollback","tenant":"a"}"#,
        r#"{"cmd":"migrate.finalize","tenant":"a","drop_source":true}"#,
        r#"{"cmd":"clients"}"#,
        r#"{"cmd":"pause.all","timeout_ms":5}"#,
        r#"{"cmd":"resume.all"}"#,
        r#"{"cmd":"tenant.kill","tenant":"a"}"#,
        r#"{"cmd":"tenant.backup","tenant":"a","to":"/b"}"#,
        r#"{"cmd":"tenant.backups","tenant":"a"}"#,
        r#"{"cmd":"tenant.restore","file":"/b/a.pgtbackup","to":"b","as":"a2"}"#,
        r#"{"cmd":"webhooks.log","tail":5}"#,
        r#"{"cmd":"migrate.drops"}"#,
        r#"{"cmd":"migrate.cancel_drop","tenant":"a"}"#,
        r#"{"cmd":"migrate.finalize","tenant":"a","drop_source_after":"30d"}"#,
    ];
    for line in lines {
        let (request, _) = parse(line.as_bytes()).unwrap_or_else(|e| panic!("{line}: {e}"));
        let expected: Value = serde_json::from_str(line).unwrap();
        assert_eq!(request.to_json(), expected, "{line}");
        let again: Request = serde_json::from_value(request.to_json()).unwrap();
        assert_eq!(again, request);
        assert_eq!(Some(request.command()), expected["cmd"].as_str());
    }
}

#[test]
fn audit_and_serialisation_rules() {
    let read = |l: &str| parse(l.as_bytes()).unwrap().0;
    assert!(!read(r#"{"cmd":"tenant.grants","tenant":"a"}"#).mutates());
    assert!(read(r#"{"cmd":"tenant.grants","tenant":"a","apply":true}"#).mutates());
    assert!(!read(r#"{"cmd":"migrate.status","tenant":"a"}"#).mutates());
    assert!(read(r#"{"cmd":"migrate.pause","tenant":"a"}"#).mutates());
    assert!(read(r#"{"cmd":"reload"}"#).changes_routes());
    assert_eq!(
        read(r#"{"cmd":"migrate.status","tenant":"a"}"#).tenant(),
        Some(&tenant("a"))
    );
    assert_eq!(read(r#"{"cmd":"stats"}"#).tenant(), None);
}

/// Reads are for viewers, and only reads: a command's API role agrees with whether it changes anything.
#[test]
fn api_roles_follow_what_a_command_changes() {
    use crate::config::ApiRole;
    let read = |l: &str| parse(l.as_bytes()).unwrap().0;
    for line in [
        r#"{"cmd":"tenants"}"#,
        r#"{"cmd":"clients"}"#,
        r#"{"cmd":"stats"}"#,
        r#"{"cmd":"migrate.status"}"#,
        r#"{"cmd":"migrate.estimate","tenant":"a","to":"b"}"#,
        r#"{"cmd":"tenant.backups","tenant":"a"}"#,
        r#"{"cmd":"pause","tenant":"a"}"#,
        r#"{"cmd":"migrate.start","tenant":"a","to":"b"}"#,
        r#"{"cmd":"tenant.backup","tenant":"a"}"#,
        r#"{"cmd":"tenant.kill","tenant":"a"}"#,
        r#"{"cmd":"reload"}"#,
        r#"{"cmd":"tenant.restore","file":"/f","to":"b"}"#,
    ] {
        let r = read(line);
        assert_eq!(r.role() == ApiRole::Viewer, !r.mutates(), "{line}");
    }
    assert_eq!(
        read(r#"{"cmd":"tenant.set","tenant":"a","backend":"b"}"#).role(),
        ApiRole::Admin
    );
    assert_eq!(
        read(r#"{"cmd":"migrate.cutover","tenant":"a"}"#).role(),
        ApiRole::Operator
    );
}
