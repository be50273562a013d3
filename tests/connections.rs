//! libpq's sslmodes against a server that only accepts TLS, with a
//! certificate for "localhost" signed by a test CA.

use crate::support::{OWNER, Pgleap, TestDb, tls_cluster};

fn dsn(db: &TestDb, host: &str, extra: &str) -> String {
    format!("host={host} port={} dbname={} user={OWNER} {extra}", db.cluster.port, db.name)
}

#[test]
fn verify_full_checks_the_chain_and_the_host_name() {
    let db = TestDb::new(tls_cluster(), "tlsfull");
    let ca = db.cluster.ca_file.as_ref().unwrap().to_str().unwrap();
    let p = Pgleap::for_cluster(db.cluster);
    p.run(&[
        "db",
        "add",
        "full",
        "--dsn",
        &dsn(&db, "localhost", &format!("sslmode=verify-full sslrootcert={ca}")),
    ])
    .ok();
    let uri = format!(
        "postgresql://{OWNER}@localhost:{}/{}?sslmode=verify-full&sslrootcert={ca}",
        db.cluster.port, db.name
    );
    p.run(&["db", "add", "uri", "--dsn", &uri]).ok();
    // The certificate names localhost, not 127.0.0.1.
    p.run(&[
        "db",
        "add",
        "byip",
        "--dsn",
        &dsn(&db, "127.0.0.1", &format!("sslmode=verify-full sslrootcert={ca}")),
    ])
    .fails_with(&["TLS", "hint: check sslmode and sslrootcert"]);
    // Without a root certificate there is nothing to verify against.
    p.run(&["db", "add", "noca", "--dsn", &dsn(&db, "localhost", "sslmode=verify-full")])
        .fails_with(&["needs a root certificate", "sslrootcert"]);
}

#[test]
fn verify_ca_ignores_the_host_name_but_not_the_issuer() {
    let db = TestDb::new(tls_cluster(), "tlsca");
    let ca = db.cluster.ca_file.as_ref().unwrap().to_str().unwrap();
    let p = Pgleap::for_cluster(db.cluster);
    p.run(&[
        "db",
        "add",
        "ca",
        "--dsn",
        &dsn(&db, "127.0.0.1", &format!("sslmode=verify-ca sslrootcert={ca}")),
    ])
    .ok();
    // A CA that did not sign the server's certificate is refused.
    let other = p.home().join("other-ca.crt");
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(&other, params.self_signed(&key).unwrap().pem()).unwrap();
    p.run(&[
        "db",
        "add",
        "other",
        "--dsn",
        &dsn(&db, "127.0.0.1", &format!("sslmode=verify-ca sslrootcert={}", other.display())),
    ])
    .fails_with(&["TLS"]);
}

#[test]
fn require_and_prefer_encrypt_without_verifying_and_disable_is_refused() {
    let db = TestDb::new(tls_cluster(), "tlsreq");
    let p = Pgleap::for_cluster(db.cluster);
    p.run(&["db", "add", "req", "--dsn", &dsn(&db, "127.0.0.1", "sslmode=require")]).ok();
    p.run(&["db", "add", "pref", "--dsn", &dsn(&db, "127.0.0.1", "")]).ok();
    p.run(&["db", "add", "allow", "--dsn", &dsn(&db, "127.0.0.1", "sslmode=allow")]).ok();
    // The server's pg_hba.conf rejects unencrypted TCP.
    p.run(&["db", "add", "plain", "--dsn", &dsn(&db, "127.0.0.1", "sslmode=disable")])
        .fails_with(&["database \"plain\"", "no encryption"]);
    // PGSSLMODE is honoured when the string does not say.
    let env = Pgleap::for_cluster(db.cluster).env("PGSSLMODE", "disable");
    env.run(&["db", "add", "plain", "--dsn", &dsn(&db, "127.0.0.1", "")])
        .fails_with(&["no encryption"]);
}

/// libpq's conventions: service files, several hosts with
/// target_session_attrs, the system trust store, and every libpq keyword
/// either honoured or refused by name.
#[test]
fn libpq_conventions_service_files_hosts_and_keywords() {
    use crate::support::{cluster, free_port};
    let db = TestDb::new(cluster(17), "libpqconv");
    let port = db.cluster.port;
    let p = Pgleap::for_cluster(db.cluster);
    std::fs::write(
        p.home().join(".pg_service.conf"),
        format!(
            "# services\n[app]\nhost=127.0.0.1\nport={port}\ndbname={}\nuser={OWNER}\n",
            db.name
        ),
    )
    .unwrap();
    p.run(&["db", "add", "bysvc", "--dsn", "service=app"]).ok();
    let by_env = p.command().env("PGSERVICE", "app").args(["db", "add", "byenv"]).output().unwrap();
    assert!(by_env.status.success(), "{}", String::from_utf8_lossy(&by_env.stderr));
    p.run(&["db", "add", "nosvc", "--dsn", "service=nope"])
        .fails_with(&["service \"nope\" is not defined", ".pg_service.conf"]);

    // The first host does not answer; the second is a primary.
    let dead = free_port();
    let two = format!(
        "host=127.0.0.1,127.0.0.1 port={dead},{port} dbname={} user={OWNER} \
         target_session_attrs=read-write keepalives=1 keepalives_idle=30",
        db.name
    );
    p.run(&["db", "add", "two", "--dsn", &two]).ok();
    let dead2 = free_port();
    let none =
        format!("host=127.0.0.1,127.0.0.1 port={dead},{dead2} dbname={} user={OWNER}", db.name);
    let out = p.run(&["db", "add", "none", "--dsn", &none]);
    out.fails_with(&["no host answered", &format!(":{dead}/"), &format!(":{dead2}/")]);

    for (option, message) in [
        ("sslcrl=/x", "\"sslcrl\" is a libpq option pgleap does not support"),
        ("gssencmode=require", "gssencmode=require is not supported"),
        ("target_session_attrs=standby", "target_session_attrs=standby is not supported"),
        ("bogus=1", "invalid connection option \"bogus\""),
    ] {
        let dsn = format!("host=127.0.0.1 port={port} dbname={} user={OWNER} {option}", db.name);
        p.run(&["db", "add", "refused", "--dsn", &dsn]).fails_with(&[message]);
    }
}

/// sslrootcert=system trusts the system's store (here SSL_CERT_FILE, as
/// OpenSSL reads it) and implies verify-full.
#[test]
fn sslrootcert_system_uses_the_system_trust_store() {
    let db = TestDb::new(tls_cluster(), "tlssystem");
    let ca = db.cluster.ca_file.as_ref().unwrap().to_str().unwrap().to_string();
    let p = Pgleap::for_cluster(db.cluster).env("SSL_CERT_FILE", &ca);
    p.run(&["db", "add", "sys", "--dsn", &dsn(&db, "localhost", "sslrootcert=system")]).ok();
    p.run(&[
        "db",
        "add",
        "weak",
        "--dsn",
        &dsn(&db, "localhost", "sslrootcert=system sslmode=require"),
    ])
    .fails_with(&["sslrootcert=system needs sslmode=verify-full"]);
    let untrusted = Pgleap::for_cluster(db.cluster).env("SSL_CERT_FILE", "/dev/null");
    untrusted
        .run(&["db", "add", "sys", "--dsn", &dsn(&db, "localhost", "sslrootcert=system")])
        .fails_with(&["hint: check sslmode and sslrootcert"]);
}
