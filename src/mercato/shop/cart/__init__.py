"""Cart: each customer's basket, priced from the catalog."""
