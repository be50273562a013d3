//! What a user compares after a move: every table's rows and every
//! object's definition, listed the same way on both servers.

use super::Sql;

/// The schemas a user's objects live in.
const USER_SCHEMAS: &str = "(select oid from pg_namespace
    where nspname not in ('pg_catalog', 'information_schema', 'pgleap')
      and nspname not like 'pg\\_toast%' and nspname not like 'pg\\_temp%')";

/// Every object's definition, as a DBA would list them to compare two
/// servers: columns, indexes, constraints, triggers, rules, functions,
/// views, types, sequences (with their values), partitions, policies,
/// privileges and comments.
pub fn objects(sql: &Sql) -> Vec<Vec<Option<String>>> {
    sql.rows(&format!(
        "set search_path = '';
         select 'column', a.attrelid::regclass::text || '.' || a.attname,
                concat_ws(' ', format_type(a.atttypid, a.atttypmod), a.attnotnull::text,
                          pg_get_expr(d.adbin, d.adrelid), a.attidentity,
                          nullif(to_jsonb(a) ->> 'attgenerated', ''),
                          (select collname from pg_collation where oid = a.attcollation
                             and a.attcollation <> 100))
           from pg_attribute a join pg_class c on c.oid = a.attrelid
           left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum
          where c.relnamespace in {USER_SCHEMAS} and c.relkind in ('r', 'p', 'v', 'm', 'f')
            and a.attnum > 0 and not a.attisdropped
         union all
         select 'index', indexrelid::regclass::text, pg_get_indexdef(indexrelid)
           from pg_index i join pg_class c on c.oid = i.indrelid
          where c.relnamespace in {USER_SCHEMAS}
         union all
         select 'constraint', conrelid::regclass::text || ' ' || conname,
                pg_get_constraintdef(oid) || ' ' || convalidated::text
           from pg_constraint where connamespace in {USER_SCHEMAS}
            -- NOT NULL: a column's attnotnull (18 also lists it here).
            and contype <> 'n'
         union all
         select 'trigger', tgrelid::regclass::text || ' ' || tgname,
                pg_get_triggerdef(oid) || ' ' || tgenabled::text
           from pg_trigger where not tgisinternal and tgname not like 'pgleap%'
            and tgrelid in (select oid from pg_class where relnamespace in {USER_SCHEMAS})
         union all
         select 'rule', schemaname || '.' || tablename || ' ' || rulename, definition
           from pg_rules where schemaname not in ('pg_catalog', 'pgleap')
         union all
         select 'function', p.oid::regprocedure::text,
                concat_ws(' ', coalesce(to_jsonb(p) ->> 'prokind',
                                        case when to_jsonb(p) ->> 'proisagg' = 'true' then 'a'
                                             when to_jsonb(p) ->> 'proiswindow' = 'true' then 'w'
                                             else 'f' end),
                          pg_get_function_result(p.oid), p.provolatile,
                          p.prosecdef::text, l.lanname, p.prosrc, p.proconfig::text)
           from pg_proc p join pg_language l on l.oid = p.prolang
          where p.pronamespace in {USER_SCHEMAS}
            -- An extension's own functions come with its version, which
            -- each major ships its own of.
            and not exists (select 1 from pg_depend e
                            where e.classid = 'pg_proc'::regclass and e.objid = p.oid
                              and e.deptype = 'e')
         union all
         select 'aggregate', aggfnoid::regprocedure::text,
                concat_ws(' ', aggkind, aggtransfn::regproc::text, aggfinalfn::regproc::text,
                          aggtranstype::regtype::text, agginitval)
           from pg_aggregate
          where aggfnoid in (select oid from pg_proc where pronamespace in {USER_SCHEMAS})
            and not exists (select 1 from pg_depend e
                            where e.classid = 'pg_proc'::regclass and e.objid = aggfnoid
                              and e.deptype = 'e')
         union all
         -- 16 and later print a view's columns without their table's
         -- name where one table is in scope: qualifiers are left out.
         select 'view', c.oid::regclass::text,
                c.relkind::text || ' ' ||
                regexp_replace(regexp_replace(pg_get_viewdef(c.oid),
                                              '(\"[^\"]+\"|\\m[[:alpha:]_][[:alnum:]_]*)\\.', '', 'g'),
                               '\\s+', ' ', 'g') || ' ' ||
                coalesce((select ispopulated::text from pg_matviews m
                          where m.schemaname = n.nspname and m.matviewname = c.relname), '')
           from pg_class c join pg_namespace n on n.oid = c.relnamespace
          where c.relnamespace in {USER_SCHEMAS} and c.relkind in ('v', 'm')
         union all
         select 'type', t.oid::regtype::text,
                concat_ws(' ', t.typtype, format_type(t.typbasetype, t.typtypmod), t.typnotnull::text,
                          (select string_agg(enumlabel, ',' order by enumsortorder)
                             from pg_enum where enumtypid = t.oid),
                          (select string_agg(pg_get_constraintdef(k.oid), ',' order by conname)
                             from pg_constraint k where k.contypid = t.oid))
           from pg_type t
          where t.typnamespace in {USER_SCHEMAS} and t.typtype in ('d', 'e', 'r')
            and not exists (select 1 from pg_depend e
                            where e.classid = 'pg_type'::regclass and e.objid = t.oid
                              and e.deptype = 'e')
         union all
         select 'sequence', s.seqrelid::regclass::text,
                concat_ws(' ', s.seqtypid::regtype::text, s.seqincrement, s.seqmin, s.seqmax,
                          s.seqcycle::text, q.last_value)
           from pg_sequence s join pg_class c on c.oid = s.seqrelid
           join pg_sequences q on q.schemaname = c.relnamespace::regnamespace::text
                              and q.sequencename = c.relname
          where c.relnamespace in {USER_SCHEMAS}
         union all
         select 'partition', c.oid::regclass::text,
                i.inhparent::regclass::text || ' ' || pg_get_expr(c.relpartbound, c.oid)
           from pg_class c join pg_inherits i on i.inhrelid = c.oid
          where c.relnamespace in {USER_SCHEMAS} and c.relispartition
         union all
         select 'policy', schemaname || '.' || tablename || ' ' || policyname,
                concat_ws(' ', permissive, roles::text, cmd, qual, with_check)
           from pg_policies
         union all
         select 'row security', oid::regclass::text,
                relrowsecurity::text || relforcerowsecurity::text
           from pg_class where relrowsecurity and relnamespace in {USER_SCHEMAS}
         union all
         -- The grantee by name: a role's oid differs between servers.
         select 'acl', c.oid::regclass::text || ' ' ||
                case a.grantee when 0 then 'PUBLIC' else a.grantee::regrole::text end,
                a.privilege_type
           from pg_class c, aclexplode(c.relacl) a
          where c.relnamespace in {USER_SCHEMAS} and a.grantee <> c.relowner
         union all
         -- Who besides the owner may use or create in each schema (the
         -- owner of public differs by major: pg_database_owner since 15).
         select 'schema acl', n.nspname,
                (select string_agg(case a.grantee when 0 then 'PUBLIC'
                                   else a.grantee::regrole::text end || ':' || a.privilege_type,
                                   ',' order by 1)
                   from aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) a
                  where a.grantee <> n.nspowner)
           from pg_namespace n where n.oid in {USER_SCHEMAS}
         union all
         select 'comment', classoid::regclass::text || ' ' || objoid::text || ' ' || objsubid,
                description
           from pg_description
          where classoid = 'pg_class'::regclass
            and objoid in (select oid from pg_class where relnamespace in {USER_SCHEMAS})
         order by 1, 2, 3;
         reset search_path"
    ))
    .into_iter()
    // The comment's key names the table by its oid, which differs: the
    // comment is compared by its text and table.
    .map(|mut row| {
        if row[0].as_deref() == Some("comment") {
            row[1] = None;
        }
        row
    })
    .collect()
}

/// Every table's rows (partitions each on their own), as text, sorted.
/// Floats by their bits: 11 and 12 print one float4 as "0.0500000007" and
/// "0.05".
pub fn rows(sql: &Sql) -> Vec<(String, Vec<Vec<Option<String>>>)> {
    let tables = sql.rows(&format!(
        "select c.oid::regclass::text,
                coalesce(string_agg(
                    case when a.atttypid in (700, 701)
                         then format('encode(float8send(%I::float8), ''hex'')', a.attname)
                         else quote_ident(a.attname) end, ', ' order by a.attnum), '')
         from pg_class c
         left join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
         where c.relkind = 'r' and c.relnamespace in {USER_SCHEMAS}
         group by c.oid order by 1"
    ));
    tables
        .into_iter()
        .map(|t| {
            let (name, columns) = (t[0].clone().unwrap(), t[1].clone().unwrap());
            let all =
                sql.rows(&format!("select row({columns})::text from only {name} x order by 1"));
            (name, all)
        })
        .collect()
}
