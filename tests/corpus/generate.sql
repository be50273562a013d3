-- Rows for a schema published without data (written for pgleap's corpus
-- test). Fills every table of the user's schemas with up to
-- `corpus.rows` rows (default 200), parents before children along the
-- foreign keys, each column from its type or from a row of the table its
-- foreign key references; columns with a default take it. A table whose
-- checks refuse the generated values is filled with its nullable columns
-- left NULL, and left empty (with a notice) if that fails too. Runs as the
-- owner, in the database's own triggers and constraints. Deterministic but
-- for the schema's own defaults (uuid_generate_v1mc(), now()).
create function pg_temp.corpus_value(t regclass, a pg_attribute) returns text
language plpgsql as $$
declare
    width int := case when a.atttypmod > 4 then a.atttypmod - 4 else 12 end;
begin
    return case a.atttypid
        when 'int2'::regtype then '(g % 32000)::int2'
        when 'int4'::regtype then 'g'
        when 'int8'::regtype then 'g::int8'
        when 'numeric'::regtype then '(g % 10)::numeric'
        when 'float4'::regtype then '(g / 4.0)::float4'
        when 'float8'::regtype then '(g / 3.0)::float8'
        when 'bool'::regtype then '(g % 2 = 0)'
        when 'text'::regtype then
            case when a.attname ~ 'mail' then '''user'' || g || ''@example.org'''
                 else format('%L || g', a.attname || ' ') end
        when 'varchar'::regtype then format('left(%L || g, %s)', left(a.attname, 3) || ' ', width)
        when 'bpchar'::regtype then format('left(md5(g::text), %s)', width)
        when 'name'::regtype then format('(%L || g)::name', a.attname)
        when 'date'::regtype then 'date ''2020-01-01'' + g'
        when 'timestamp'::regtype then 'timestamp ''2020-01-01'' + g * interval ''1 hour'''
        when 'timestamptz'::regtype then 'timestamptz ''2020-01-01 00:00+00'' + g * interval ''1 hour'''
        when 'time'::regtype then 'time ''00:00'' + g * interval ''1 minute'''
        when 'uuid'::regtype then format('md5(%L || g)::uuid', t::text)
        when 'json'::regtype then 'json_build_object(''g'', g)'
        when 'jsonb'::regtype then 'jsonb_build_object(''g'', g)'
        when 'bytea'::regtype then 'decode(md5(g::text), ''hex'')'
        else null
    end;
end $$;

create function pg_temp.corpus_fill(t regclass, n int) returns void
language plpgsql as $$
declare
    a pg_attribute;
    fk record;
    value text;
    all_cols text[] := '{}';
    all_values text[] := '{}';
    needed_cols text[] := '{}';
    needed_values text[] := '{}';
    attempt int;
begin
    for a in select * from pg_attribute
             where attrelid = t and attnum > 0 and not attisdropped order by attnum loop
        continue when a.attidentity <> '' or coalesce(to_jsonb(a) ->> 'attgenerated', '') <> '';
        -- A foreign key column takes the referenced column of one row of
        -- its parent (all columns of a composite key from the same row).
        select k.confrelid::regclass as parent,
               (select attname from pg_attribute
                where attrelid = k.confrelid
                  and attnum = k.confkey[array_position(k.conkey, a.attnum)]) as col,
               (select string_agg(quote_ident(attname), ', ' order by attnum) from pg_attribute
                where attrelid = k.confrelid and attnum = any(k.confkey)) as ordering
          into fk
          from pg_constraint k
         where k.conrelid = t and k.contype = 'f' and a.attnum = any(k.conkey)
         limit 1;
        if fk.parent is not null then
            value := format(
                '(select %I from %s order by %s offset g %% greatest((select count(*) from %s), 1) limit 1)',
                fk.col, fk.parent, fk.ordering, fk.parent);
        elsif a.atthasdef then
            continue;
        else
            value := pg_temp.corpus_value(t, a);
        end if;
        if value is null then
            continue;
        end if;
        all_cols := all_cols || quote_ident(a.attname);
        all_values := all_values || value;
        if a.attnotnull or fk.parent is not null then
            needed_cols := needed_cols || quote_ident(a.attname);
            needed_values := needed_values || value;
        end if;
    end loop;
    for attempt in 1..2 loop
        begin
            if attempt = 2 then
                all_cols := needed_cols;
                all_values := needed_values;
            end if;
            execute format(
                'insert into %s %s select %s from generate_series(1, %s) g on conflict do nothing',
                t,
                case when cardinality(all_cols) > 0 then '(' || array_to_string(all_cols, ', ') || ')' else '' end,
                array_to_string(all_values, ', '),
                n);
            return;
        exception when others then
            raise notice 'corpus: % (attempt %): %', t, attempt, sqlerrm;
        end;
    end loop;
end $$;

do $$
declare
    n int := coalesce(nullif(current_setting('corpus.rows', true), '')::int, 200);
    remaining oid[];
    t oid;
    progress bool;
begin
    select coalesce(array_agg(c.oid order by c.oid), '{}') into remaining
      from pg_class c join pg_namespace s on s.oid = c.relnamespace
     where c.relkind in ('r', 'p') and not c.relispartition
       and s.nspname not in ('pg_catalog', 'information_schema')
       and s.nspname not like 'pg\_%';
    while cardinality(remaining) > 0 loop
        progress := false;
        foreach t in array remaining loop
            if not exists (select 1 from pg_constraint k
                           where k.conrelid = t and k.contype = 'f' and k.confrelid <> t
                             and k.confrelid = any(remaining)) then
                perform pg_temp.corpus_fill(t::regclass, n);
                remaining := array_remove(remaining, t);
                progress := true;
            end if;
        end loop;
        -- A cycle of foreign keys: one of them goes first.
        if not progress then
            perform pg_temp.corpus_fill(remaining[1]::regclass, n);
            remaining := remaining[2:];
        end if;
    end loop;
end $$;
