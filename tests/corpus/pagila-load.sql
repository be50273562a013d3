-- Writes during the move ({i} counts from 0): rentals and payments
-- inserted, films and customers updated (the trigger sets last_update and
-- the full-text column), a payment moved to the next month's partition, a
-- film's actor removed.
insert into rental (rental_date, inventory_id, customer_id, staff_id)
    values (timestamptz '2026-06-01 00:00:00+00' + {i} * interval '1 minute', 1 + {i} % 4581, 1 + {i} % 599, 1);
insert into payment (customer_id, staff_id, rental_id, amount, payment_date)
    values (1 + {i} % 599, 1, currval('rental_rental_id_seq'), 2.99,
            timestamptz '2026-06-01 00:00:00+00' + {i} * interval '1 minute');
update film set description = 'Retold ' || {i}, rental_rate = rental_rate + 0.01 where film_id = 1 + {i} % 1000;
update customer set email = 'moved' || {i} || '@example.org' where customer_id = 1 + {i} % 599;
update payment set payment_date = payment_date + interval '1 month' where payment_id = 1 + {i} * 3;
delete from film_actor where (actor_id, film_id) = (select actor_id, film_id from film_actor order by film_id, actor_id limit 1);
