"""The engine-agnostic KVCOMM core (torch only, never sglang): RoPE shift of stored keys,
anchor pools, matching weights, the entropy gate, eviction, offset estimation, and the serving
loop that plans a request's reuse and learns from dense prefills (``reuse.KVComm``)."""
