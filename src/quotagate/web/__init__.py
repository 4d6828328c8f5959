"""The pages and endpoints people reach through Envoy: their balance and the purchase of credits."""
