package main

import "github.com/Azure/azure-sdk-for-go/sdk/azidentity"

// objectID: azidentity v1.6.0 has no ObjectID option (added in v1.8.0); main.go reports that.
func objectID(string) azidentity.ManagedIDKind { return nil }
