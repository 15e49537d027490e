"""The engine-agnostic KVCOMM core (torch only, never sglang): RoPE shift of stored keys,
anchor pools, matching weights, the entropy gate, eviction and offset estimation."""
