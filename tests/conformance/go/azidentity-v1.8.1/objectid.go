package main

import "github.com/Azure/azure-sdk-for-go/sdk/azidentity"

// objectID: azidentity v1.8.0 and later have an ObjectID option (v1.6.0's objectid.go returns nil).
func objectID(v string) azidentity.ManagedIDKind { return azidentity.ObjectID(v) }
