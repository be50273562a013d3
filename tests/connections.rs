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
