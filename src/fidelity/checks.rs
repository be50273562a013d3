//! Checks made before anything is created: roles the target lacks, tables
//! whose row security the role cannot bypass, functions only a superuser
//! can create.

use super::{Scope, relations, schemas};
use crate::error::Result;
use crate::pg::{Conn, NamedQuery, PgVersion, Sql, quote_ident};

/// Roles named by the source's privileges, policies and settings that the
/// target lacks.
pub async fn missing_roles(src: &Conn, tgt: &Conn, scope: &Scope) -> Result<Vec<String>> {
    let schemas = schemas(src, scope).await?;
    let oids = relations(src, scope, &schemas).await?;
    let rows = src.query(GRANTEES, &[&oids, &schemas]).await?;
    let wanted: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let present: Vec<String> =
        tgt.query(ROLES_PRESENT, &[&wanted]).await?.iter().map(|r| r.get(0)).collect();
    Ok(wanted.into_iter().filter(|r| !present.contains(r)).collect())
}

/// Tables whose row security applies to this role (forced on a table it
/// owns, and the role does not bypass row security): pgleap could not read
/// them whole. Its sessions run with `row_security = off`, so reading one
/// fails instead of returning fewer rows.
pub async fn forced_row_security(c: &Conn) -> Result<Vec<String>> {
    let rows = c.query_qualified(FORCED_ROW_SECURITY, &[]).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Functions in a language only a superuser may create functions in (C,
/// untrusted procedural languages): pg_restore of the schema would fail on
/// them as a table owner. One line each, with the language.
pub async fn untrusted_functions(c: &Conn, scope: &Scope) -> Result<Vec<String>> {
    let schemas = schemas(c, scope).await?;
    let rows = c.query_qualified(&untrusted_functions_sql(c.version()), &[&schemas]).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The command that creates a role the target lacks: without a password
/// (pgleap cannot read one), NOLOGIN unless `login`.
pub fn create_role_sql(role: &str, login: bool) -> String {
    format!("CREATE ROLE {} {}", quote_ident(role), if login { "LOGIN" } else { "NOLOGIN" })
}

// The catalog queries of this module, named.

const GRANTEES: &str = "select distinct r.rolname::text from pg_roles r
    where r.rolname <> current_user and (
      exists (select 1 from pg_class c, aclexplode(c.relacl) a
              where c.oid = any($1) and a.grantee = r.oid)
      or exists (select 1 from pg_attribute t, aclexplode(t.attacl) a
                 where t.attrelid = any($1) and a.grantee = r.oid)
      or exists (select 1 from pg_proc p join pg_namespace n on n.oid = p.pronamespace,
                        aclexplode(p.proacl) a
                 where n.nspname = any($2) and a.grantee = r.oid)
      or exists (select 1 from pg_namespace n, aclexplode(n.nspacl) a
                 where n.nspname = any($2) and a.grantee = r.oid)
      or exists (select 1 from pg_policy p where p.polrelid = any($1)
                 and r.oid = any(p.polroles))
      or exists (select 1 from pg_default_acl d, aclexplode(d.defaclacl) a
                 where a.grantee = r.oid or d.defaclrole = r.oid)
      or exists (select 1 from pg_db_role_setting s
                 where s.setrole = r.oid and s.setdatabase =
                       (select oid from pg_database where datname = current_database())))
    order by 1";

const ROLES_PRESENT: &str = "select rolname::text from pg_roles where rolname = any($1)";

const FORCED_ROW_SECURITY: &str = "select c.oid::regclass::text from pg_class c
    join pg_namespace n on n.oid = c.relnamespace
    where c.relrowsecurity and c.relforcerowsecurity and c.relkind in ('r', 'p')
      and n.nspname not in ('pg_catalog', 'information_schema')
      and not exists (select 1 from pg_roles r where r.rolname = current_user
                      and (r.rolsuper or r.rolbypassrls))
    order by 1";

/// Functions in an untrusted language. An aggregate's own row reads
/// `language internal` whatever it is made of: CREATE AGGREGATE needs no
/// superuser, and its support functions are judged as functions of their
/// own (a C state function in the schema is named; a built-in one exists
/// on every server).
fn untrusted_functions_sql(v: PgVersion) -> String {
    let aggregate = if v.has_prokind() { "p.prokind = 'a'" } else { "p.proisagg" };
    format!(
        "select p.oid::regprocedure::text || ' (language ' || l.lanname || ')'
         from pg_proc p join pg_namespace n on n.oid = p.pronamespace
         join pg_language l on l.oid = p.prolang
         where n.nspname = any($1) and not l.lanpltrusted and not {aggregate}
           and not exists (select 1 from pg_depend d where d.classid = 'pg_proc'::regclass
                           and d.objid = p.oid and d.deptype = 'e')
         order by 1"
    )
}

/// The catalog queries of this module, for `pgleap db check-queries`.
pub(crate) fn catalog_queries(v: PgVersion) -> Vec<NamedQuery> {
    vec![
        NamedQuery::new("fidelity: roles the source names", GRANTEES),
        NamedQuery::new("fidelity: roles present", ROLES_PRESENT),
        NamedQuery::new("fidelity: forced row security", FORCED_ROW_SECURITY),
        NamedQuery::new("fidelity: functions in untrusted languages", untrusted_functions_sql(v)),
    ]
}
