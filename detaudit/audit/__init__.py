"""The targets of an audit — a remote endpoint, a managed server, the local engine — and what they share: the
request of a run and the capability probe. Each target turns (prompt, arm, sample index) into one answer row."""
