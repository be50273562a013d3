-- Writes during the move ({i} counts from 0): an invoice with its line,
-- a track repriced, a playlist entry removed, a customer's company changed.
insert into invoice (customer_id, invoice_date, billing_city, billing_country, total)
    values (1 + {i} % 59, timestamp '2026-01-01 00:00' + {i} * interval '1 hour', 'Zürich', 'Switzerland', 1.98);
insert into invoice_line (invoice_id, track_id, unit_price, quantity)
    values (currval('invoice_invoice_id_seq'), 1 + {i} % 3503, 0.99, 2);
update track set unit_price = unit_price + 0.01, bytes = bytes + 1 where track_id = 1 + {i} * 7 % 3503;
delete from playlist_track
    where (playlist_id, track_id) = (select playlist_id, track_id from playlist_track order by 1, 2 limit 1);
update customer set company = 'Moved ' || {i} where customer_id = 1 + {i} % 59;
