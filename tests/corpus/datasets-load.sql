-- Writes during the move ({i} counts from 0): a title's description
-- changed, an element invented, the last-ranked country removed.
update public.netflix_shows set description = description || ' (seen {i})'
    where show_id = 's' || (1 + {i} % 8807);
insert into public.periodic_table ("AtomicNumber", "Element", "Symbol", "AtomicMass")
    values (1000 + {i}, 'Pgleapium ' || {i}, 'Pl', 299.5 + {i});
delete from public."2019" where overall_rank = (select max(overall_rank) from public."2019");
