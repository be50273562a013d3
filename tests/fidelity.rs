//! Schema fidelity: after an upgrade under writes, the target holds every
//! object of the source (compared by definition, kind by kind), with
//! statistics and privileges; verify names what is missing.

use crate::support::{OWNER, Pgleap, Sql, TestDb, cluster, writes_until_fenced};

/// Roles the fixture grants to: `pgleap_reader` exists on every server (as
/// an operator would create it before the move); the auditor (a name of
/// the test's own: the servers are shared) only on the source.
/// The migrating role bypasses row security: the fixture forces it on a
/// table, which pgleap could not read whole otherwise.
fn roles(src: &TestDb, dst: &TestDb, auditor: &str) {
    for db in [src, dst] {
        let admin = db.cluster.superuser("postgres");
        let _ = admin.try_exec("create role pgleap_reader nologin");
        admin.exec(&format!("alter role {OWNER} bypassrls"));
    }
    src.cluster.superuser("postgres").exec(&format!("create role {auditor} nologin"));
}

/// A schema with an object of every kind the migration must carry, in a
/// schema whose name needs quoting beside `public`.
pub const FIXTURE: &str = r#"
    create schema "Sales Data";
    create type mood as enum ('sad', 'ok', 'happy');
    create domain positive as int check (value > 0) default 1;
    create type pair as (a int, b text);
    create function "Sales Data".total(int, int) returns int language sql immutable
        as $$ select $1 + $2 $$;
    create function stamp() returns trigger language plpgsql as
        $$ begin new.note := coalesce(new.note, '') || '+'; return new; end $$;
    revoke execute on function "Sales Data".total(int, int) from public;
    grant execute on function "Sales Data".total(int, int) to pgleap_reader;

    create table customer (id int primary key, name text not null collate "C",
                           m mood default 'ok', score positive,
                           tenant text not null default 'a');
    alter table customer alter column name set statistics 500;
    create table "Sales Data"."Rental" (id bigint generated always as identity primary key,
                                        customer_id int not null references customer,
                                        at date not null, p pair);
    create index "rental by day" on "Sales Data"."Rental" (at) where at > date '2000-01-01';
    create table payment (id int, customer_id int not null, rental_id bigint,
                          amount numeric(8,2) check (amount >= 0), paid date not null,
                          note text, primary key (id, paid))
        partition by range (paid);
    create table payment_2000 partition of payment
        for values from ('2000-01-01') to ('2001-01-01');
    create table payment_2001 partition of payment
        for values from ('2001-01-01') to ('2002-01-01');
    create index payment_2000_customer on payment_2000 (customer_id);
    create index payment_2001_customer on payment_2001 (customer_id);
    alter table payment_2000 add constraint payment_2000_customer_fk
        foreign key (customer_id) references customer;
    alter table payment_2001 add constraint payment_2001_rental_fk
        foreign key (rental_id) references "Sales Data"."Rental";
    create trigger payment_2001_stamp before insert on payment_2001
        for each row execute procedure stamp();
    create index payment_paid on payment (paid);
    alter table customer add constraint name_not_blank check (name <> '') not valid;
    alter table customer replica identity full;
    create unique index rental_id_at on "Sales Data"."Rental" (id, at);
    alter table "Sales Data"."Rental" replica identity using index rental_id_at;

    insert into customer select g, 'c' || g, 'happy', g, case when g % 2 = 0 then 'a' else 'b' end
        from generate_series(1, 300) g;
    insert into "Sales Data"."Rental" (customer_id, at)
        select g % 300 + 1, date '2000-01-01' + g from generate_series(1, 500) g;
    insert into payment select g, g % 300 + 1, g % 500 + 1, g, date '2000-01-01' + g % 700
        from generate_series(1, 2000) g;

    create materialized view customer_totals as
        select customer_id, sum(amount) as total from payment group by customer_id;
    create unique index customer_totals_id on customer_totals (customer_id);
    create view "big spenders" as select * from customer_totals where total > 1000;

    alter table customer enable row level security;
    alter table customer force row level security;
    create policy tenant_a on customer for select to pgleap_reader using (tenant = 'a');
    create policy own_rows on customer as restrictive for update to pgleap_auditor
        using (tenant = current_user) with check (tenant = current_user);

    create sequence invoice_no as int start 1000 increment 5 cache 10 cycle;
    alter sequence invoice_no owned by customer.id;

    comment on table customer is 'who pays';
    comment on column customer.name is 'as printed';
    comment on index payment_paid is 'by day';
    comment on constraint name_not_blank on customer is 'legacy rows may be blank';
    comment on schema "Sales Data" is 'the shop';

    grant usage on schema "Sales Data" to pgleap_reader;
    grant select on customer, payment, customer_totals, "big spenders" to pgleap_reader;
    grant select on "Sales Data"."Rental" to pgleap_auditor;
    grant update (name) on customer to pgleap_reader;
    grant usage on sequence invoice_no to pgleap_reader;
    alter default privileges in schema "Sales Data" grant select on tables to pgleap_reader;
"#;

fn with_fixture(major: u32, target: u32, label: &str) -> (Pgleap, TestDb, TestDb) {
    let src = TestDb::new(cluster(major), &format!("{label}src"));
    let dst = TestDb::new(cluster(target), &format!("{label}dst"));
    let auditor = format!("pgleap_auditor_{label}");
    roles(&src, &dst, &auditor);
    src.sql().exec(&FIXTURE.replace("pgleap_auditor", &auditor));
    let admin = src.cluster.superuser("postgres");
    admin
        .exec(&format!("alter database \"{}\" set search_path = public, \"Sales Data\"", src.name));
    // A role's setting in this database: the migrating role may set it on
    // the target once it has ADMIN on the role (it has on those it
    // creates).
    admin.exec(&format!("alter role {auditor} in database \"{}\" set work_mem = '8MB'", src.name));
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    (p, src, dst)
}

/// Every object's definition, kind by kind, as a user would list them.
fn objects(sql: &Sql) -> Vec<Vec<Option<String>>> {
    sql.rows(
        "set search_path = '';
         select 'index', indexrelid::regclass::text, pg_get_indexdef(indexrelid)
           from pg_index where indrelid::regclass::text not like 'pgleap.%'
            and indrelid::regclass::text not like 'pg\\_%'
            and indrelid::regclass::text not like 'information\\_schema.%'
         union all
         select 'constraint', conrelid::regclass::text || ' ' || conname,
                pg_get_constraintdef(oid)
           from pg_constraint where contype in ('c', 'f', 'p', 'u', 'x') and conrelid <> 0
            and connamespace in (select oid from pg_namespace
                                 where nspname in ('public', 'Sales Data'))
         union all
         select 'trigger', tgrelid::regclass::text || ' ' || tgname, pg_get_triggerdef(oid)
           from pg_trigger where not tgisinternal and tgname not like 'pgleap%'
         union all
         select 'policy', tablename || ' ' || policyname,
                concat_ws(' ', permissive, roles::text, cmd, qual, with_check)
           from pg_policies
         union all
         select 'rls', relname, relrowsecurity::text || relforcerowsecurity::text
           from pg_class where relrowsecurity
         union all
         select 'replica identity', relname, relreplident::text
           from pg_class where relreplident <> 'd' and relkind = 'r'
            and relnamespace in (select oid from pg_namespace
                                 where nspname in ('public', 'Sales Data'))
         union all
         select 'matview', matviewname, ispopulated::text from pg_matviews
         union all
         select 'acl', c.oid::regclass::text || ' ' || a.grantee::regrole::text,
                a.privilege_type
           from pg_class c, aclexplode(c.relacl) a
          where a.grantee <> c.relowner
            and c.relnamespace in (select oid from pg_namespace
                                   where nspname in ('public', 'Sales Data'))
         union all
         select 'comment', objoid::regclass::text || objsubid, description
           from pg_description where classoid = 'pg_class'::regclass
         union all
         select 'setting', coalesce((select rolname from pg_roles where oid = setrole), ''),
                array_to_string(setconfig, ',')
           from pg_db_role_setting
          where setdatabase = (select oid from pg_database where datname = current_database())
         order by 1, 2;
         reset search_path",
    )
}

/// `upgrade --cutover auto` of the fixture under writes; every object on
/// the target as on the source, statistics everywhere, verify clean.
fn upgrade_keeps_every_object(major: u32, target: u32) {
    let (p, src, dst) = with_fixture(major, target, &format!("fid{major}to{target}"));
    let writer = writes_until_fenced(src.sql(), |i| {
        format!(
            "insert into public.customer values ({i} + 1000, 'w{i}', 'sad', 1, 'a');
             insert into \"Sales Data\".\"Rental\" (customer_id, at) values ({i} + 1000, now());
             insert into public.payment values ({i} + 5000, {i} + 1000, null, 1, '2001-06-01');
             update public.customer set score = score + 1 where id = {i} % 300 + 1;"
        )
    });
    let out = p.run(&[
        "upgrade",
        "--source",
        &src.dsn(),
        "--target",
        &dst.dsn(),
        "--cutover",
        "auto",
        "--create-roles",
    ]);
    println!("{out}");
    let text = out.ok();
    assert!(
        text.contains(&format!("the target lacks role(s) pgleap_auditor_fid{major}to{target}")),
        "the missing role is not named:\n{out}"
    );
    assert!(writer.join().unwrap() > 0, "no write went through during the upgrade");
    assert!(
        text.contains("verify: every object of the source on the target, every table analyzed"),
        "{out}"
    );
    let (s, d) = (src.sql(), dst.sql());
    assert_eq!(objects(&d), objects(&s));
    // The materialized view is populated (in `objects`), as of its refresh
    // after the copy: the source's is as of its own last refresh.
    for table in ["public.customer", "\"Sales Data\".\"Rental\"", "public.payment"] {
        let q = format!("select t::text from {table} t order by 1");
        assert_eq!(d.rows(&q), s.rows(&q), "{table}");
    }
    let never_analyzed = "select count(*) from pg_class c
        where c.relkind in ('r', 'm') and c.relnamespace in
              (select oid from pg_namespace where nspname in ('public', 'Sales Data'))
          and pg_stat_get_last_analyze_time(c.oid) is null";
    assert_eq!(d.value(never_analyzed), "0");
    let verify = p.run(&["verify", "upgrade"]);
    assert!(verify.ok().contains("schema: every object equal"), "{verify}");
}

#[test]
fn upgrade_keeps_every_object_pg12_to_pg17() {
    upgrade_keeps_every_object(12, 17);
}

#[test]
fn upgrade_keeps_every_object_pg15_to_pg17() {
    upgrade_keeps_every_object(15, 17);
}

#[test]
fn upgrade_keeps_every_object_pg17_to_pg18() {
    upgrade_keeps_every_object(17, 18);
}

/// Verify names each object missing on the target, and cutover refuses to
/// switch until it is there (or is told to switch anyway).
#[test]
fn verify_names_missing_objects_and_cutover_waits_for_them_pg15_to_pg17() {
    let (p, src, dst) = with_fixture(15, 17, "fidv");
    dst.cluster.superuser("postgres").exec(&format!(
        "create role pgleap_auditor_fidv nologin; grant pgleap_auditor_fidv to {OWNER} with admin option"
    ));
    p.declare(&src, &dst, &["--all-tables"]);
    p.run(&["schema", "copy", "--from", "src", "--to", "dst"]).ok();
    p.add_sync(&["--onetimecopy", "always"]);
    let out = p.run(&["verify", "s"]);
    assert!(out.ok().contains("schema: every object equal"), "{out}");
    let d = dst.sql();
    d.exec(
        "drop index payment_2000_customer; drop policy tenant_a on customer;
         revoke select on customer from pgleap_reader;
         alter function \"Sales Data\".total(int, int) volatile",
    );
    let out = p.run(&["verify", "s"]);
    assert_eq!(out.code, 1, "{out}");
    let text = out.to_string();
    for expected in [
        "verify found differences in 0 table(s) and 4 schema object(s)",
        "index public.payment_2000_customer is missing on the target",
        "policy tenant_a on public.customer is missing on the target",
        "privilege SELECT on table public.customer to \"pgleap_reader\" is missing",
        "function \"Sales Data\".total(integer,integer) differs",
    ] {
        assert!(text.contains(expected), "missing {expected:?}:\n{out}");
    }
    // ready and a dry run judge as the cutover does (the function blocks,
    // the rest pgleap creates) and change nothing on the target.
    let ready = p.run(&["ready", "s"]);
    assert_eq!(ready.code, 1, "{ready}");
    assert!(ready.stdout.contains("total(integer,integer)"), "{ready}");
    assert!(!ready.stdout.contains("payment_2000_customer"), "{ready}");
    p.run(&["cutover", "s", "--dry-run"]).fails_with(&[
        "cutover refused",
        "1 schema object(s)",
        "total(integer,integer)",
    ]);
    assert_eq!(
        d.value("select count(*) from pg_indexes where indexname = 'payment_2000_customer'"),
        "0",
        "the dry run built the index"
    );
    // Cutover creates what it can (the index, the policy, the grant) and
    // refuses while the function differs, before fencing anything.
    p.run(&["cutover", "s"]).fails_with(&[
        "cutover refused: the target lacks or differs in 1 schema object(s)",
        "total(integer,integer)",
        "--allow-schema-differences",
    ]);
    assert!(src.sql().try_exec("insert into customer values (9999, 'x', 'ok', 1, 'a')").is_ok());
    assert_eq!(
        d.value("select count(*) from pg_indexes where indexname = 'payment_2000_customer'"),
        "1"
    );
    let out = p.run(&["cutover", "s", "--allow-schema-differences"]);
    assert!(out.ok().contains("the source now refuses writes"), "{out}");
    let out = p.run(&["verify", "s"]);
    assert_eq!(out.code, 1, "{out}");
    assert!(out.to_string().contains("total(integer,integer) differs"), "{out}");
}

/// What only a superuser can create is named before anything is written
/// (a function in an untrusted language: the schema restore would fail),
/// or by schema copy with the server's refusal (an event trigger), and
/// cutover waits for it.
#[test]
fn objects_only_a_superuser_can_create_are_named_pg15_to_pg17() {
    let src = TestDb::new(cluster(15), "fidsusrc");
    let dst = TestDb::new(cluster(17), "fidsudst");
    src.sql().exec("create table t (id int primary key)");
    let admin = src.cluster.superuser(&src.name);
    admin.exec(
        "create function public.c_abs(int4) returns int4 language internal as 'int4abs';
         create function public.audit_ddl() returns event_trigger language plpgsql as
             $$ begin null; end $$;
         create event trigger audit_ddl on ddl_command_end execute procedure public.audit_ddl();",
    );
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.run(&["upgrade", "--source", &src.dsn(), "--target", &dst.dsn(), "--cutover", "auto"])
        .fails_with(&[
            "functions only a superuser can create on the target",
            "public.c_abs(integer) (language internal)",
        ]);
    assert_eq!(src.sql().value("select count(*) from pg_namespace where nspname = 'pgleap'"), "0");

    admin.exec("drop function public.c_abs(int4)");
    p.declare(&src, &dst, &["--all-tables"]);
    let out = p.run(&["schema", "copy", "--from", "src", "--to", "dst"]);
    assert!(
        out.ok().contains("not copied: event trigger audit_ddl is missing on the target (not created: permission denied"),
        "{out}"
    );
    p.add_sync(&["--onetimecopy", "always"]);
    p.run(&["kick", "s", "--wait", "60"]).ok();
    p.run(&["cutover", "s"]).fails_with(&["cutover refused", "event trigger audit_ddl"]);
    admin.exec("drop event trigger audit_ddl");
}

/// User-defined aggregates of every common shape, made by the table owner:
/// preflight takes them (an aggregate reads `language internal` in the
/// catalog, which is not a C function), the upgrade moves them, and
/// verify finds them equal; they compute the same on both servers.
const AGGREGATES: &str = "
    create table words (id int primary key, w text, n int4);
    insert into words select g, 'w' || g, g from generate_series(1, 20) g;
    create function gc_sfunc(text, text) returns text language sql immutable
        as $$ select case when $1 is null then $2 else $1 || ',' || $2 end $$;
    create aggregate group_concat(text) (sfunc = gc_sfunc, stype = text);
    create function sum_sfunc(int8, int4) returns int8 language plpgsql immutable
        as $$ begin return coalesce($1, 0) + $2; end $$;
    create function sum_final(int8) returns text language sql immutable
        as $$ select 'total ' || $1 $$;
    create aggregate my_sum(int4) (sfunc = sum_sfunc, stype = int8, finalfunc = sum_final,
                                   initcond = '0');
    create function first_sfunc(anyelement, anyelement) returns anyelement language sql
        immutable as $$ select coalesce($1, $2) $$;
    create aggregate my_first(anyelement) (sfunc = first_sfunc, stype = anyelement);
    create function inv_sfunc(int8, int4) returns int8 language sql immutable
        as $$ select $1 - $2 $$;
    create aggregate msum(int4) (sfunc = sum_sfunc, stype = int8, initcond = '0',
                                 msfunc = sum_sfunc, minvfunc = inv_sfunc, mstype = int8,
                                 minitcond = '0');
    create function os_sfunc(text[], text) returns text[] language sql immutable
        as $$ select $1 || $2 $$;
    create function os_final(text[], text) returns text language sql immutable
        as $$ select array_to_string($1, '|') $$;
    create aggregate ordered_concat(order by text) (sfunc = os_sfunc, stype = text[],
                                                    finalfunc = os_final, finalfunc_extra,
                                                    initcond = '{}');
    create view summary as
        select group_concat(w) g, my_sum(n) s, my_first(w) f,
               ordered_concat() within group (order by w desc) o
        from (select * from words order by id) x;";

fn aggregates_move(major: u32) {
    let src = TestDb::new(cluster(major), &format!("agg{major}src"));
    let dst = TestDb::new(cluster(17), &format!("agg{major}dst"));
    src.sql().exec(AGGREGATES);
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    let out =
        p.run(&["upgrade", "--source", &src.dsn(), "--target", &dst.dsn(), "--cutover", "auto"]);
    assert!(out.ok().contains("writes were fenced for"), "{out}");
    let verify = p.run(&["verify", "upgrade"]);
    assert!(verify.ok().contains("schema: every object equal"), "{verify}");
    let q = "select g, s, f, o, (select string_agg(x::text, ',') from
                 (select msum(n) over (order by id rows between 2 preceding and current row) x
                  from words) w) from summary";
    assert_eq!(dst.sql().rows(q), src.sql().rows(q));
    p.run(&["teardown", "upgrade"]).ok();
}

#[test]
fn user_defined_aggregates_move_pg10_to_pg17() {
    aggregates_move(10);
}

#[test]
fn user_defined_aggregates_move_pg15_to_pg17() {
    aggregates_move(15);
}

/// A global default privilege the source revoked (new functions not
/// executable by PUBLIC) is made on the target too, and verify compares
/// it: without it every function created after the move would be
/// executable by everyone.
#[test]
fn default_privileges_revoked_from_public_are_copied_pg12_to_pg17() {
    let src = TestDb::new(cluster(12), "defaclsrc");
    let dst = TestDb::new(cluster(17), "defacldst");
    src.sql().exec(
        "create table t (id int primary key);
         alter default privileges revoke execute on functions from public;
         alter default privileges revoke usage on types from public;",
    );
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    let out =
        p.run(&["upgrade", "--source", &src.dsn(), "--target", &dst.dsn(), "--cutover", "never"]);
    out.ok();
    let verify = p.run(&["verify", "upgrade"]);
    assert!(verify.ok().contains("schema: every object equal"), "{verify}");
    dst.sql().exec("create function f() returns int language sql as 'select 1'");
    assert_eq!(
        dst.sql().value("select has_function_privilege('public', 'f()', 'execute')"),
        "f",
        "a new function is executable by PUBLIC on the target"
    );
    // Dropped on the target: verify names it.
    dst.sql().exec(
        "alter default privileges grant execute on functions to public;
         alter default privileges grant usage on types to public;",
    );
    let verify = p.run(&["verify", "upgrade"]);
    assert_eq!(verify.code, 1, "{verify}");
    assert!(verify.stdout.contains("revoked from PUBLIC"), "{verify}");
    p.run(&["stop"]).ok();
    p.run(&["teardown", "upgrade"]).ok();
}
