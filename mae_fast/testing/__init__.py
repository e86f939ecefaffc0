"""What the product is checked against: `mae_fast.testing.reference`, the eager oracle of every
fused op and both model APIs. The product never imports it."""
