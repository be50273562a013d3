-- Writes during the move ({i} counts from 0): an order with a line, a
-- product's stock and price (real) changed, the oldest order line removed,
-- a customer's contact renamed.
insert into orders (order_id, customer_id, employee_id, order_date, ship_via, freight, ship_name)
    values (20000 + {i}, 'ALFKI', 1 + {i} % 9, date '2026-01-01' + {i} % 300, 1 + {i} % 3, 1.5 + {i}, 'Shïp ' || {i});
insert into order_details values (20000 + {i}, 1 + {i} % 77, 18.5, 1 + {i} % 10, 0.05);
update products set units_in_stock = units_in_stock + 1, unit_price = unit_price * 1.01
    where product_id = 1 + {i} % 77;
delete from order_details
    where (order_id, product_id) = (select order_id, product_id from order_details
                                    where order_id < 20000 order by 1, 2 limit 1);
update customers set contact_name = 'Contact ' || {i}
    where customer_id = (select customer_id from customers order by 1 offset {i} % 91 limit 1);
