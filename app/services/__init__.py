"""The service layer: what the routes (and tests) call. Routes hold no queries; services hold no HTTP."""
