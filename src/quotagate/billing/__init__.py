"""Phase 2: credits bought by card through Stripe Checkout (purchase page, signed webhooks, reconciliation)."""
