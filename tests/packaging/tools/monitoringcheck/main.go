// Command monitoringcheck validates Prometheus Operator objects (PodMonitor, PrometheusRule)
// against the operator's own Go API types: each YAML document is decoded strictly, so an
// unknown or misspelt field, or a value of the wrong type, is an error. Documents of other
// kinds are skipped. Used by tests/packaging/test_monitoring.py.
//
//	monitoringcheck FILE...   (- reads standard input); prints one line per object
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

func main() {
	failed := false
	for _, name := range os.Args[1:] {
		if err := checkFile(name); err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", name, err)
			failed = true
		}
	}
	if failed || len(os.Args) < 2 {
		os.Exit(1)
	}
}

func checkFile(name string) error {
	var in io.Reader = os.Stdin
	if name != "-" {
		f, err := os.Open(name)
		if err != nil {
			return err
		}
		defer f.Close()
		in = f
	}
	reader := utilyaml.NewYAMLReader(bufio.NewReader(in))
	for {
		doc, err := reader.Read()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		js, err := yaml.YAMLToJSON(doc)
		if err != nil {
			return err
		}
		if string(bytes.TrimSpace(js)) == "null" {
			continue
		}
		var meta struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
			Metadata   struct {
				Name string `json:"name"`
			} `json:"metadata"`
		}
		if err := json.Unmarshal(js, &meta); err != nil {
			return err
		}
		var obj any
		switch {
		case meta.APIVersion == "monitoring.coreos.com/v1" && meta.Kind == "PodMonitor":
			obj = &monitoringv1.PodMonitor{}
		case meta.APIVersion == "monitoring.coreos.com/v1" && meta.Kind == "PrometheusRule":
			obj = &monitoringv1.PrometheusRule{}
		default:
			continue
		}
		dec := json.NewDecoder(bytes.NewReader(js))
		dec.DisallowUnknownFields()
		if err := dec.Decode(obj); err != nil {
			return fmt.Errorf("%s %s: %w", meta.Kind, meta.Metadata.Name, err)
		}
		fmt.Printf("ok %s %s\n", meta.Kind, meta.Metadata.Name)
	}
}
