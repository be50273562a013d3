-- Writes during the move ({i} counts from 0), as the application's
-- requests do (its triggers record the user from request.jwt.claim.username):
-- an address inserted, a population and a partial population changed
-- (coordinates inside the checks), a goal report deleted.
set request.jwt.claim.username = 'app';
insert into apflora.adresse (name, email) values ('Adresse {i}', 'a{i}@example.org');
update apflora.pop set name = 'Pop {i}', x = 2500000 + {i}
    where id = (select id from apflora.pop order by id offset {i} % 200 limit 1);
update apflora.tpop set flurname = 'Flur {i}', y = 1100000 + {i}
    where id = (select id from apflora.tpop order by id offset {i} % 200 limit 1);
delete from apflora.zielber where id = (select id from apflora.zielber order by id limit 1);
