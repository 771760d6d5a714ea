// Command pgx drives one pgx v4 connection through Shardgate and prints "OK <checksum>".
//
// Usage: pgx postgresql://user:password@host:port/db
//
//	pgx schema-change postgresql://... TABLE
//
// The second form runs one statement from pgx's statement cache around schema changes of a new table
// TABLE and prints one line per run ("ok <columns>" or "error <SQLSTATE>"), for a test to compare with
// the same steps run directly against PostgreSQL.
//
// The checksum is the sum of every value read back, so the Python test can
// recompute it and catch a wrong answer as well as an error. Any failure is
// printed on stderr and exits 1.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/jackc/pgconn"
	"github.com/jackc/pgx/v4"
)

const (
	preparedRuns = 5
	batchSize    = 4
	copyRows     = 1000
	manyRows     = 10000
)

// step wraps an error with the name of the step that failed.
func step(name string, err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("%s: %w", name, err)
}

func simpleQuery(ctx context.Context, conn *pgx.Conn) (int64, error) {
	var answer int64
	err := conn.QueryRow(ctx, "SELECT 40 + 2", pgx.QuerySimpleProtocol(true)).Scan(&answer)
	if err == nil && answer != 42 {
		err = fmt.Errorf("got %d, want 42", answer)
	}
	return answer, step("simple query", err)
}

func extendedQuery(ctx context.Context, conn *pgx.Conn) (int64, error) {
	var product int64
	var label string
	err := conn.QueryRow(ctx, "SELECT $1::int8 * $2::int8, $3::text || '!'", 6, 7, "pgx").Scan(&product, &label)
	if err == nil && (product != 42 || label != "pgx!") {
		err = fmt.Errorf("got (%d, %q), want (42, \"pgx!\")", product, label)
	}
	return product + int64(len(label)), step("extended query", err)
}

// preparedAcrossTransactions prepares once, then uses the statement in separate
// transactions: in transaction pooling each may run on another server connection.
func preparedAcrossTransactions(ctx context.Context, conn *pgx.Conn) (int64, error) {
	if _, err := conn.Prepare(ctx, "shardgate_add", "SELECT $1::int8 + $2::int8"); err != nil {
		return 0, step("prepare", err)
	}
	var total int64
	for i := int64(0); i < preparedRuns; i++ {
		tx, err := conn.Begin(ctx)
		if err != nil {
			return 0, step("begin", err)
		}
		var sum int64
		if err := tx.QueryRow(ctx, "shardgate_add", i, 100).Scan(&sum); err != nil {
			_ = tx.Rollback(ctx)
			return 0, step("execute prepared", err)
		}
		if err := tx.Commit(ctx); err != nil {
			return 0, step("commit", err)
		}
		if sum != i+100 {
			return 0, fmt.Errorf("prepared run %d: got %d, want %d", i, sum, i+100)
		}
		total += sum
	}
	return total, nil
}

func batch(ctx context.Context, conn *pgx.Conn) (int64, error) {
	b := &pgx.Batch{}
	for i := int64(1); i <= batchSize; i++ {
		b.Queue("SELECT $1::int8 * 10", i)
	}
	results := conn.SendBatch(ctx, b)
	var total int64
	for i := int64(1); i <= batchSize; i++ {
		var value int64
		if err := results.QueryRow().Scan(&value); err != nil {
			_ = results.Close()
			return 0, step("batch row", err)
		}
		if value != i*10 {
			_ = results.Close()
			return 0, fmt.Errorf("batch item %d: got %d, want %d", i, value, i*10)
		}
		total += value
	}
	return total, step("batch close", results.Close())
}

func copyFrom(ctx context.Context, conn *pgx.Conn) (total int64, err error) {
	table := fmt.Sprintf("pgx_copy_%d_%d", os.Getpid(), time.Now().UnixNano())
	if _, err := conn.Exec(ctx, "CREATE TABLE "+table+" (id int8 PRIMARY KEY, label text NOT NULL)"); err != nil {
		return 0, step("create table", err)
	}
	defer func() {
		if _, dropErr := conn.Exec(ctx, "DROP TABLE IF EXISTS "+table); dropErr != nil && err == nil {
			err = step("drop table", dropErr)
		}
	}()
	rows := make([][]interface{}, 0, copyRows)
	for i := int64(1); i <= copyRows; i++ {
		rows = append(rows, []interface{}{i, fmt.Sprintf("row-%d", i)})
	}
	copied, err := conn.CopyFrom(ctx, pgx.Identifier{table}, []string{"id", "label"}, pgx.CopyFromRows(rows))
	if err != nil {
		return 0, step("copy from", err)
	}
	if copied != copyRows {
		return 0, fmt.Errorf("copy from: copied %d rows, want %d", copied, copyRows)
	}
	var count, sum int64
	if err := conn.QueryRow(ctx, "SELECT count(*), sum(id)::int8 FROM "+table).Scan(&count, &sum); err != nil {
		return 0, step("read back copy", err)
	}
	if count != copyRows || sum != copyRows*(copyRows+1)/2 {
		return 0, fmt.Errorf("read back copy: got count %d sum %d", count, sum)
	}
	return count + sum, nil
}

func manyRowsSum(ctx context.Context, conn *pgx.Conn) (int64, error) {
	rows, err := conn.Query(ctx, "SELECT g::int8 FROM generate_series(1, $1::int4) AS g", manyRows)
	if err != nil {
		return 0, step("query many rows", err)
	}
	defer rows.Close()
	var total, count int64
	for rows.Next() {
		var value int64
		if err := rows.Scan(&value); err != nil {
			return 0, step("scan many rows", err)
		}
		total += value
		count++
	}
	if err := rows.Err(); err != nil {
		return 0, step("many rows", err)
	}
	if count != manyRows {
		return 0, fmt.Errorf("many rows: got %d rows, want %d", count, manyRows)
	}
	return total, nil
}

func run(url string) (int64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return 0, step("connect", err)
	}
	defer conn.Close(context.Background())

	steps := []func(context.Context, *pgx.Conn) (int64, error){
		simpleQuery, extendedQuery, preparedAcrossTransactions, batch, copyFrom, manyRowsSum,
	}
	var checksum int64
	for _, s := range steps {
		value, err := s(ctx, conn)
		if err != nil {
			return 0, err
		}
		checksum += value
	}
	return checksum, nil
}

// schemaChange prints what each run of a cached SELECT * gives as the table under it changes.
func schemaChange(url, table string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return step("connect", err)
	}
	defer conn.Close(context.Background())
	query := "SELECT * FROM " + table
	run := func(q interface {
		Query(context.Context, string, ...interface{}) (pgx.Rows, error)
	}) {
		rows, err := q.Query(ctx, query)
		columns := 0
		if err == nil {
			columns = len(rows.FieldDescriptions())
			for rows.Next() {
			}
			rows.Close()
			err = rows.Err()
		}
		var pgErr *pgconn.PgError
		switch {
		case err == nil:
			fmt.Printf("ok %d\n", columns)
		case errors.As(err, &pgErr):
			fmt.Printf("error %s\n", pgErr.Code)
		default:
			fmt.Printf("failure %v\n", err)
		}
	}
	for _, sql := range []string{"CREATE TABLE " + table + " (a int4, b int4)", "INSERT INTO " + table + " VALUES (1, 2)"} {
		if _, err := conn.Exec(ctx, sql); err != nil {
			return step("setup", err)
		}
	}
	run(conn)
	for _, change := range []string{"ADD COLUMN c int4", "ALTER COLUMN a TYPE int8", "DROP COLUMN b"} {
		if _, err := conn.Exec(ctx, "ALTER TABLE "+table+" "+change); err != nil {
			return step("alter", err)
		}
		run(conn)
		run(conn)
		tx, err := conn.Begin(ctx)
		if err != nil {
			return step("begin", err)
		}
		run(tx)
		if err := tx.Rollback(ctx); err != nil {
			return step("rollback", err)
		}
	}
	_, err = conn.Exec(ctx, "DROP TABLE "+table)
	return step("drop", err)
}

func main() {
	if len(os.Args) == 4 && os.Args[1] == "schema-change" {
		if err := schemaChange(os.Args[2], os.Args[3]); err != nil {
			fmt.Fprintln(os.Stderr, "ERROR", err)
			os.Exit(1)
		}
		return
	}
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: pgx postgresql://user:password@host:port/db")
		os.Exit(2)
	}
	checksum, err := run(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, "ERROR", err)
		os.Exit(1)
	}
	fmt.Printf("OK %d\n", checksum)
}
