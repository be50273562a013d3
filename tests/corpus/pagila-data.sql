-- Rows for pagila's schema (the upstream data file is not in the fetched
-- snapshot): written for pgleap's corpus test, deterministic, about the
-- size of the original's. Loaded between pagila-pre-data.sql and
-- pagila-post-data.sql, as pg_dump orders a restore (the foreign keys and
-- triggers come after the rows).
set search_path = public;
insert into language (name)
    select n from unnest(array['English', 'Italian', 'Japanese', 'Mandarin', 'French', 'German']) n;
insert into category (name) select 'Category ' || g from generate_series(1, 16) g;
insert into actor (first_name, last_name)
    select 'Fïrst' || g, (array['GUINESS', 'WAHLBERG', 'CHASE', 'DAVIS', 'LOLLOBRIGIDA'])[1 + g % 5] || g
    from generate_series(1, 200) g;
insert into film (title, description, release_year, language_id, original_language_id,
                  rental_duration, rental_rate, length, replacement_cost, rating,
                  special_features, fulltext)
    select 'FILM ' || g, 'A story told ' || g || ' times',
           2000 + g % 26, 1 + g % 6, case when g % 7 = 0 then 2 end,
           3 + g % 5, 0.99 + (g % 5), 46 + g % 140, 9.99 + (g % 21), 
           (array['G', 'PG', 'PG-13', 'R', 'NC-17'])[1 + g % 5]::mpaa_rating,
           case g % 3 when 0 then array['Trailers'] when 1 then array['Trailers', 'Commentaries']
                      else array['Deleted Scenes', 'Behind the Scenes'] end,
           to_tsvector('pg_catalog.english', 'FILM ' || g || ' A story told ' || g || ' times')
    from generate_series(1, 1000) g;
insert into film_actor (actor_id, film_id)
    select distinct 1 + (g * 7) % 200, 1 + g % 1000 from generate_series(1, 5462) g;
insert into film_category (film_id, category_id) select g, 1 + g % 16 from generate_series(1, 1000) g;
insert into country (country) select 'Country ' || g from generate_series(1, 109) g;
insert into city (city, country_id) select 'City ' || g, 1 + g % 109 from generate_series(1, 600) g;
insert into address (address, address2, district, city_id, postal_code, phone)
    select g || ' Main Street', case when g % 3 = 0 then '' end, 'District ' || g % 40,
           1 + g % 600, lpad((g * 37 % 100000)::text, 5, '0'), '555' || g
    from generate_series(1, 603) g;
insert into staff (first_name, last_name, address_id, email, store_id, username, password, picture)
    values ('Mike', 'Hillyer', 3, 'Mike.Hillyer@example.org', 1, 'Mike', md5('x'), '\x89504e47'),
           ('Jon', 'Stephens', 4, 'Jon.Stephens@example.org', 2, 'Jon', md5('y'), null);
insert into store (manager_staff_id, address_id) values (1, 1), (2, 2);
insert into customer (store_id, first_name, last_name, email, address_id, activebool, create_date, active)
    select 1 + g % 2, 'Customer' || g, 'Näme' || g, 'customer' || g || '@example.org', 4 + g,
           g % 50 <> 0, date '2022-02-14' + g % 30, (g % 50 <> 0)::int
    from generate_series(1, 599) g;
insert into inventory (film_id, store_id) select 1 + g % 1000, 1 + g % 2 from generate_series(1, 4581) g;
insert into rental (rental_date, inventory_id, customer_id, return_date, staff_id)
    select timestamptz '2022-01-01 00:00:00+00' + g * interval '2 hours 17 minutes',
           1 + g % 4581, 1 + g % 599,
           case when g % 100 <> 0 then timestamptz '2022-01-03 00:00:00+00' + g * interval '2 hours 17 minutes' end,
           1 + g % 2
    from generate_series(1, 16044) g;
-- One payment per rental, in the month partition of its date (2022-01 to
-- 2026-05: a payment moved a month later stays inside the partitions).
insert into payment (customer_id, staff_id, rental_id, amount, payment_date)
    select customer_id, staff_id, rental_id, 0.99 + rental_id % 10, rental_date + interval '1 hour'
    from rental;
