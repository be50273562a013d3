//! Table shapes beyond the ordinary: an inheritance tree (each table of it
//! is itself: copy, apply and verify never mix a child's rows into its
//! parent), a table without columns, a table of generated columns only, a
//! large table keyed by uuid.

use crate::support::{Pgleap, Sql, TestDb, cluster};

const TREE: &str = "
    create table animal (id serial primary key, name text not null);
    create table dog (breed text) inherits (animal);
    alter table dog add primary key (id);
    create table cat (lives int) inherits (animal);
    create table nothing ();
    create table computed (g int generated always as (42) stored);
    insert into animal (name) select 'a' || g from generate_series(1, 100) g;
    insert into dog (name, breed) select 'd' || g, 'b' from generate_series(1, 100) g;
    insert into cat (name, lives) select 'c' || g, 9 from generate_series(1, 50) g;
    insert into nothing default values; insert into nothing default values;
    insert into computed default values;";

/// Every row of one table alone, as text, in a stable order.
fn rows(sql: &Sql, table: &str) -> Vec<Vec<Option<String>>> {
    sql.rows(&format!("select t::text, count(*) from only {table} t group by 1 order by 1"))
}

#[test]
fn inheritance_trees_and_tables_without_columns_migrate_table_by_table_pg12_to_pg17() {
    let src = TestDb::new(cluster(12), "treesrc");
    let dst = TestDb::new(cluster(17), "treedst");
    src.sql().exec(TREE);
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.declare(&src, &dst, &["--all-tables", "--all-sequences"]);
    p.run(&["schema", "copy", "--from", "src", "--to", "dst"]).ok();
    p.add_sync(&["--onetimecopy", "always"]);
    p.run(&["start"]).ok();
    p.run(&["kick", "s", "--wait", "60"]).ok();
    let s = src.sql();
    for round in 0..5 {
        // Statements naming the parent change the children's rows too.
        s.exec(&format!(
            "update animal set name = name || '!' where id % 7 = {round};
             delete from animal where id % 13 = {round};
             update only animal set name = 'only' where id % 5 = {round};
             update dog set breed = 'r{round}' where id % 3 = 0;
             insert into dog (name, breed) values ('new{round}', 'x');
             insert into cat (name, lives) values ('new{round}', {round});
             update cat set lives = lives - 1 where id % 4 = 0;
             insert into nothing default values;
             delete from nothing where ctid = (select min(ctid) from nothing);
             insert into nothing default values;
             insert into computed default values;"
        ));
    }
    s.exec("truncate only animal; insert into animal (name) values ('after truncate')");
    p.run(&["kick", "s", "--wait", "60"]).ok();
    let d = dst.sql();
    for table in ["animal", "dog", "cat", "nothing", "computed"] {
        assert_eq!(rows(&d, table), rows(&s, table), "{table}");
    }
    let verify = p.run(&["verify", "s"]);
    assert!(verify.ok().contains("public.nothing"), "{verify}");
    p.run(&["stop"]).ok();
}

#[test]
fn a_large_table_keyed_by_uuid_is_copied_pg15_to_pg17() {
    let src = TestDb::new(cluster(15), "uuidsrc");
    let dst = TestDb::new(cluster(17), "uuiddst");
    src.sql().exec(
        "create table doc (id uuid primary key, body text);
         insert into doc select md5(g::text)::uuid, 'b' || g from generate_series(1, 210000) g;
         analyze doc;",
    );
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.declare(&src, &dst, &["--all-tables"]);
    p.run(&["schema", "copy", "--from", "src", "--to", "dst"]).ok();
    p.add_sync(&["--onetimecopy", "always"]);
    p.run(&["kick", "s", "--wait", "120", "--jobs", "2"]).ok();
    let digest = "select count(*), md5(string_agg(id::text || body, ',' order by id)) from doc";
    assert_eq!(dst.sql().rows(digest), src.sql().rows(digest));
    // With statistics from the start (an ANALYZE, not autovacuum's).
    let analyzed = "select last_analyze is not null from pg_stat_user_tables where relname = 'doc'";
    assert_eq!(dst.sql().value(analyzed), "t");
    // Copied in parallel, by ranges of blocks (its key is no integer).
    let parts =
        dst.sql().value("select count(*) from pgleap.copy_units where predicate like 'ctid >= %'");
    assert!(parts.parse::<i32>().unwrap() >= 2, "{parts} block ranges");
}

#[test]
fn definitions_are_read_fully_qualified_whatever_the_search_path_pg15_to_pg17() {
    let src = TestDb::new(cluster(15), "qualsrc");
    let dst = TestDb::new(cluster(17), "qualdst");
    src.cluster
        .superuser("postgres")
        .exec(&format!("alter database \"{}\" set search_path = public, kinds", src.name));
    src.sql().exec(
        "create schema kinds;
         create type kinds.state as enum ('open', 'closed');
         create table ticket (id int primary key, s kinds.state not null);
         create index ticket_open on ticket (id) where s = 'open';
         insert into ticket select g, case when g % 2 = 0 then 'open' else 'closed' end::kinds.state
         from generate_series(1, 100) g;",
    );
    let p = Pgleap::for_clusters(&[src.cluster, dst.cluster]);
    p.declare(&src, &dst, &["--all-tables"]);
    p.run(&["schema", "copy", "--from", "src", "--to", "dst"]).ok();
    p.add_sync(&["--onetimecopy", "always"]);
    p.run(&["kick", "s", "--wait", "60"]).ok();
    // Read without a search_path: the target's database has the source's
    // (public, kinds), under which the definition prints unqualified.
    let index = "set search_path = ''; select pg_get_indexdef('public.ticket_open'::regclass)";
    assert!(dst.sql().value(index).contains("'open'::kinds.state"), "{}", dst.sql().value(index));
    assert_eq!(p.run(&["verify", "s"]).code, 0);
}
